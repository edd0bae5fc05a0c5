"""Crash-safe writes: every artefact is written under a temporary name in the same folder, fsynced and renamed
over its target (``os.replace``), so a reader, or a re-run after a crash, sees the old file or the new one, never a
part of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".tmp-"  # temporary files are ``.<name>.tmp-<pid>-<random>`` beside their target



@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed over ``path``, so readers
    see the old file or the new one, never a part; on an error it is removed and ``path`` is left as it was.

    Writers that take a path (``torch.save``, ``savefig``, ``to_csv``, ``pq.write_table``) write to the yielded one;
    since its name does not end like ``path``, give them the format explicitly where they guess it from the name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)

def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (``atomic_path``); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)

def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

def is_temp_file(name: str) -> bool:
    """Whether a file name is one of ``atomic_path``'s temporary names."""
    return name.startswith(".") and TEMP_MARK in name
