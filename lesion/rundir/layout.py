"""``RunDir``: the paths of one run directory and what a command does with it (pull, push, record, lock).

``root`` is always a local folder; for a remote run (``s3://bucket/run``) it is the staging folder of ``uri``
(``~/.cache/lesion/runs/<hash>``, ``$LESION_CACHE`` overrides ``~/.cache/lesion``). ``uri`` is the address to hand
to Ray (e.g. Ray Train's ``storage_path``) so that every node writes to the same place.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lesion.rundir.atomic import TEMP_MARK
from lesion.rundir.locks import LOCK_FILE, FileLock, ObjectLock, pid_alive
from lesion.rundir.manifest import read_manifest, record_entry
from lesion.rundir.sync import is_ray_storage, is_uri, pull_remote, push_remote, staging_dir

log = logging.getLogger(__name__)


def remove_stale_temp_files(root: str | Path) -> list[Path]:
    """Delete temporary files and folders under ``root`` left by writers that are no longer running on this host
    (a crash); returns them. Ray's own storage (``RAY_STORAGE``) is left alone."""
    root = Path(root)
    removed = []
    for path in sorted(root.rglob(f".*{TEMP_MARK}*")) if root.is_dir() else ():
        pid = path.name.rpartition(TEMP_MARK)[2].partition("-")[0]
        if (not path.exists() or is_ray_storage(path.relative_to(root).as_posix())
                or (pid.isdigit() and pid_alive(int(pid)))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", len(removed), root)
    return removed


class RunDir:
    """Paths of one run: ``data/``, ``tune/``, ``models/<name>/``, ``eval/`` and ``manifest.json``.

    ``root`` is always a local folder; for a remote run it is the staging folder of ``uri``.
    """

    def __init__(self, root: str | Path):
        text = str(root)
        if is_uri(text):
            self.uri = text.rstrip("/")
            self.root = staging_dir(self.uri)
        else:
            self.root = Path(text.removeprefix("file://")).expanduser().resolve()
            self.uri = str(self.root)
            self.manifest()  # a run this lesion cannot read fails here, before any stage starts

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def is_remote(self) -> bool:
        """Whether the run lives in remote storage (and ``root`` is only its local staging copy)."""
        return is_uri(self.uri)

    def pull(self) -> int:
        """Mirror the remote run into ``root`` (files gone remotely are removed locally); returns files copied."""
        if not self.is_remote:
            return 0
        copied = pull_remote(self.uri, self.root)
        self.manifest()  # a run this lesion cannot read fails here, before any stage starts
        return copied

    def push(self, *parts: str) -> int:
        """Mirror ``parts`` of the run (relative paths; all of it when none) to the remote run; returns files copied.

        ``manifest.json`` and ``config.yaml`` always go along. Remote files under a pushed part that no longer exist
        locally are deleted, so a re-made artefact does not keep stale files. Pushes from threads of one process
        (the workflow's nodes) take turns.
        """
        return push_remote(self.uri, self.root, parts) if self.is_remote else 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def model_dir(self, name: str) -> Path:
        """Folder of one trained model: checkpoint, resolved config, metrics history, plots."""
        return self.models / name

    def trained_models(self) -> list[str]:
        """Names of models with a best checkpoint, in name order."""
        if not self.models.is_dir():
            return []
        return sorted(p.parent.name for p in self.models.glob("*/best.pt"))

    def manifest(self) -> dict[str, Any]:
        """The manifest's artefact entries: one per artefact (``data``, ``models/<name>``, ``tune``, ``eval``)."""
        return read_manifest(self.manifest_path, self.uri)

    def record(self, artefact: str, *, config: Any, fingerprint: str, **extra: Any) -> None:
        """Record in the manifest what made ``artefact``: command line, config, fingerprint, versions, time.

        Call it once all of the artefact's files are in place. The read-modify-write holds an exclusive lock
        (``MANIFEST_LOCK``), so trainings of one run finishing at once lose no entry, and the manifest is replaced
        atomically.
        """
        record_entry(self.manifest_path, self.uri, artefact, config=config, fingerprint=fingerprint, **extra)

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Make this process the run's only writer for the block (``command`` names it to others).

        A local run gets ``RUN/.lock`` (pid, host, command, start time; a lock left by a process of this host that
        has ended is taken over, with a log line); a remote run a lock object with a heartbeat (``ObjectLock``).
        Raises ``RunLockedError`` naming the owner when another process holds it. Temporary files left in the run
        by a crashed writer are removed once the lock is held.
        """
        held = ObjectLock(self.uri, command) if self.is_remote else FileLock(self.root / LOCK_FILE, command)
        held.acquire()
        try:
            remove_stale_temp_files(self.root)
            yield
        finally:
            held.release()

    def is_current(self, artefact: str, fingerprint: str) -> bool:
        """Whether ``artefact`` was already made with this fingerprint (so the stage can be skipped)."""
        return self.manifest().get(artefact, {}).get("fingerprint") == fingerprint
