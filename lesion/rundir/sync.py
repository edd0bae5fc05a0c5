"""A remote run (``s3://bucket/run``, ``gs://bucket/run``) and its local staging copy: ``pull`` brings the run down
and ``push`` sends finished artefacts back, file by file, copying only files whose size or modification time differ
(as ``aws s3 sync`` does). Pushing a file to object storage is one PUT (or one multipart upload), which S3 and GCS
make visible only when complete, so pushed objects are never partial; ``manifest.json`` goes last. Ray's own storage
under a remote run (``RAY_STORAGE``) is written straight to the URI and never synced.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from lesion.rundir.atomic import is_temp_file
from lesion.rundir.locks import LOCK_FILE, MANIFEST_LOCK

log = logging.getLogger(__name__)

# Folders Ray Train/Tune write straight to a remote run's URI (checkpoints, trial state): pull and push leave them be.
RAY_STORAGE = ("models/*/ray", "tune/ray", "tune/trials")

LOCAL_ONLY = (LOCK_FILE, MANIFEST_LOCK)  # never synced between a remote run and its staging copy

_PUSH_LOCK = threading.Lock()  # serialises pushes from threads of one process



def filesystem_of(location: str):
    """(pyarrow filesystem, path) of a local path or a pyarrow-supported storage URI."""
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)

def remove_tree(location: str) -> None:
    """Delete a local folder or a folder in a pyarrow-supported storage URI (nothing when it is absent)."""
    from pyarrow import fs as pafs

    filesystem, path = filesystem_of(location)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)

def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names remote storage (``scheme://...``) rather than a local path (``file://`` is local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")

def staging_dir(uri: str) -> Path:
    """The local folder that mirrors the remote run ``uri``."""
    cache = Path(os.environ.get("LESION_CACHE", "~/.cache/lesion")).expanduser()
    return cache / "runs" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def pull_remote(uri: str, root: Path) -> int:
    """Mirror the remote run ``uri`` into ``root`` (files gone remotely are removed locally); returns files copied."""
    from pyarrow import fs as pafs

    remote, base = pafs.FileSystem.from_uri(uri)
    copied = _mirror(remote, base, _local_fs(), str(root), "", remote_is_source=True)
    log.info("pulled %d file(s) from %s to %s", copied, uri, root)
    return copied


def push_remote(uri: str, root: Path, parts: tuple[str, ...]) -> int:
    """Mirror ``parts`` of the staging copy ``root`` (relative paths; all of it when none) to the remote run ``uri``;
    returns files copied. ``manifest.json`` and ``config.yaml`` always go along; pushes from threads of one process
    take turns."""
    from pyarrow import fs as pafs

    remote, base = pafs.FileSystem.from_uri(uri)
    copied = 0
    with _PUSH_LOCK:
        for part in parts or ("",):
            part = part.strip("/")
            copied += _mirror(_local_fs(), _join(str(root), part), remote, _join(base, part), part,
                              remote_is_source=False)
        for name in ("manifest.json", "config.yaml") if parts else ():
            if (root / name).is_file():
                copied += _mirror(_local_fs(), str(root / name), remote, _join(base, name), name,
                                  remote_is_source=False)
    log.info("pushed %d file(s) from %s to %s", copied, root, uri)
    return copied


def _local_fs():
    from pyarrow import fs as pafs

    return pafs.LocalFileSystem()

def _join(base: str, part: str) -> str:
    return f"{base.rstrip('/')}/{part}" if part else base

def _files(fs, path: str) -> dict[str, Any]:
    """Files under ``path`` (or ``path`` itself when it is a file), keyed by path relative to ``path``."""
    from pyarrow import fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {"": info}
    if info.type != pafs.FileType.Directory:
        return {}
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {f.path[len(path.rstrip("/")) + 1 :]: f for f in found if f.type == pafs.FileType.File}

def is_ray_storage(path: str) -> bool:
    """Whether a run-relative path lies in Ray's own storage (``RAY_STORAGE``)."""
    return any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, f"{pattern}/*") for pattern in RAY_STORAGE)

def _is_synced(path: str) -> bool:
    """Whether a run-relative path is mirrored between a remote run and its staging copy."""
    return not (is_ray_storage(path) or path in LOCAL_ONLY or is_temp_file(path.rpartition("/")[2]))

def _mirror(src_fs, src: str, dst_fs, dst: str, part: str, *, remote_is_source: bool) -> int:
    """Make ``dst`` hold exactly the files of ``src`` (``part`` of the run); copy only new files and ones whose size
    or mtime differ, ``manifest.json`` last. Ray's storage (``RAY_STORAGE``), the locks (``LOCAL_ONLY``) and
    temporary files are left alone on both sides.

    After each copy the local file's mtime is set to the remote object's, so the two sides compare equal next time.
    """
    from pyarrow import fs as pafs

    def synced(files: dict[str, Any]) -> dict[str, Any]:
        return {rel: info for rel, info in files.items() if _is_synced(_join(part, rel).strip("/"))}

    want, have = synced(_files(src_fs, src)), synced(_files(dst_fs, dst))
    copied = []
    for rel, info in sorted(want.items(), key=lambda item: (_join(part, item[0]) == "manifest.json", item[0])):
        old = have.get(rel)
        if old is not None and old.size == info.size and old.mtime_ns == info.mtime_ns:
            continue
        target = _join(dst, rel)
        if remote_is_source:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(_join(src, rel), target, source_filesystem=src_fs, destination_filesystem=dst_fs)
        copied.append(rel)
    for rel in sorted(set(have) - set(want)):
        dst_fs.delete_file(_join(dst, rel))
    if copied:
        local, remote = (dst, src) if remote_is_source else (src, dst)
        stamps = _files(src_fs if remote_is_source else dst_fs, remote)
        for rel in copied:
            ns = stamps[rel].mtime_ns
            os.utime(_join(local, rel), ns=(ns, ns))
    return len(copied)
