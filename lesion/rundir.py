"""The run directory: where every artefact of a workflow run lives, and the manifest that says what made each.

A run directory is a local path (a mounted NFS share included) or a URI that pyarrow understands (``s3://bucket/run``,
``gs://bucket/run``). For a URI every command works in a local staging folder (``~/.cache/lesion/runs/<hash>``,
``$LESION_CACHE`` overrides ``~/.cache/lesion``): ``pull()`` brings the remote run down and ``push()`` sends finished
artefacts back, file by file, copying only files whose size or modification time differ (as ``aws s3 sync`` does).
``uri`` is the address to hand to Ray (e.g. Ray Train's ``storage_path``) so that every node writes to the same place.
Ray's own storage under a remote run (``RAY_STORAGE``) is written straight to the URI and never synced.

Crash safety: every artefact is written through ``atomic_path``/``write_atomic`` (a temporary name in the same folder,
fsync, ``os.replace``), so a reader (or a re-run after a crash) sees the old file or the new one, never a part of one;
the manifest entry of a stage is recorded after all of its artefacts, and ``record`` does its read-modify-write under
an exclusive lock. Pushing a file to object storage is one PUT (or one multipart upload), which S3 and GCS make
visible only when complete, so pushed objects are never partial either; ``push`` sends ``manifest.json`` last.
``RunDir.lock`` makes one command the run's only writer (a lock file, or a lock object with a heartbeat for a URI).

``manifest.json`` carries the run directory's format (``RUN_FORMAT``): a run written by an older lesion (format 1: a
manifest without a format field) is migrated when it is read; a run written by a newer lesion is refused with a
message, never misread.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import fnmatch
import dataclasses
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Folders Ray Train/Tune write straight to a remote run's URI (checkpoints, trial state): pull and push leave them be.
RAY_STORAGE = ("models/*/ray", "tune/ray", "tune/trials")

RUN_FORMAT = 2  # bump when the run directory's layout or manifest changes; add the migration to _migrate
_RUN_COMMAND = "lesion run --run {run}"  # what re-makes a run whose format cannot be migrated

TEMP_MARK = ".tmp-"  # temporary files are ``.<name>.tmp-<pid>-<random>`` beside their target
LOCK_FILE = ".lock"  # the run's one-writer lock (a file, or an object in a remote run)
MANIFEST_LOCK = ".manifest.lock"  # serialises the manifest's read-modify-write
LOCAL_ONLY = (LOCK_FILE, MANIFEST_LOCK)  # never synced between a remote run and its staging copy
_PUSH_LOCK = threading.Lock()  # serialises pushes from threads of one process
HEARTBEAT_S = 30.0  # a remote lock's owner refreshes it this often ...
STALE_S = 120.0  # ... and a remote lock not refreshed for this long belongs to a process that is gone
SETTLE_S = 1.0  # a new remote lock is read back after this pause (see _ObjectLock)

_VERSIONED_PACKAGES = ("lesion", "torch", "torchvision", "timm", "ray", "optuna", "scikit-learn", "pyarrow", "numpy")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, file lists, versions)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def changed_settings(section: Any) -> dict[str, Any]:
    """The fields of a config section (a dataclass) that differ from its defaults: what a stage's fingerprint
    hashes, so that a setting added in a later release, at its default, leaves artefacts made before it current.
    Changing a default therefore needs the stage's version constant bumped."""
    defaults = dataclasses.asdict(type(section)())
    return {key: value for key, value in dataclasses.asdict(section).items() if value != defaults[key]}


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class RunFormatError(ValueError):
    """A run directory this lesion cannot read: written by a newer lesion, or with a malformed manifest."""


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


def remove_stale_temp_files(root: str | Path) -> list[Path]:
    """Delete temporary files and folders under ``root`` left by writers that are no longer running on this host
    (a crash); returns them. Ray's own storage (``RAY_STORAGE``) is left alone."""
    root = Path(root)
    removed = []
    for path in sorted(root.rglob(f".*{TEMP_MARK}*")) if root.is_dir() else ():
        pid = path.name.rpartition(TEMP_MARK)[2].partition("-")[0]
        if (not path.exists() or _is_ray_storage(path.relative_to(root).as_posix())
                or (pid.isdigit() and _pid_alive(int(pid)))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", len(removed), root)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block; waits for other holders."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_manifest(path: Path, run: str) -> dict[str, Any]:
    """The artefact entries of the manifest at ``path`` (``{}`` when absent), migrated from older formats.

    Raises ``RunFormatError`` for a manifest of a newer format than ``RUN_FORMAT`` or one that is malformed.
    """
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFormatError(f"{path}: not valid JSON ({exc}); re-make the run with `{_RUN_COMMAND.format(run=run)}`"
                             f" in a new run directory") from exc
    if not isinstance(document, dict):
        raise RunFormatError(f"{path}: expected a JSON object, got {type(document).__name__}")
    version = document.get("format", 1)  # format 1 (lesion before run formats) had no field
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunFormatError(f"{path}: format must be an integer from 1 to {RUN_FORMAT}, got {version!r}")
    if version > RUN_FORMAT:
        raise RunFormatError(f"{path}: run format {version} is newer than this lesion reads (format {RUN_FORMAT}): "
                             f"open it with the lesion that wrote it (the manifest's versions.lesion) or upgrade lesion")
    entries = _migrate(document, version)
    if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
        raise RunFormatError(f"{path}: expected an object of artefact entries (format {version}), got {entries!r}")
    return entries


def _migrate(document: dict[str, Any], version: int) -> Any:
    """Artefact entries of a manifest of format ``version``, in the current format's terms."""
    if version == 1:
        # Format 1: the artefact entries at the top level, and the workflow's own record of what tuning searched
        # on ("workflow/tune"), which the "tune" entry's fingerprint now covers. Fingerprints of format 1 are of
        # other formulas: stages whose inputs are unchanged re-run once, and nothing is misread.
        return {name: entry for name, entry in document.items() if name != "workflow/tune"}
    return document.get("artefacts")


class RunLockedError(RuntimeError):
    """The run directory is being written by another command (see ``RunDir.lock``)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _lock_record(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": _now(),
            "heartbeat": time.time(), "token": secrets.token_hex(8)}


def _parse_owner(blob: bytes) -> dict[str, Any]:
    try:
        owner = json.loads(blob)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _locked(where: str, owner: dict[str, Any], remedy: str) -> RunLockedError:
    return RunLockedError(f"{where}: the run is locked by {owner.get('command')!r} (pid {owner.get('pid')} on host "
                          f"{owner.get('host')}, since {owner.get('since')}); only one command may write a run at a "
                          f"time: wait for it to finish or stop it, or use another run directory; {remedy}")


class _FileLock:
    """``RUN/.lock``: an ``fcntl.flock``-ed file holding the owner's record. The kernel drops the flock when its
    process ends, so a lock file nobody holds was left by a crash; on this host it is taken over."""

    def __init__(self, path: Path, command: str):
        self.path, self.command, self.fd = path, command, -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked(str(self.path), self._owner(), "the lock goes when that process ends") from None
            try:
                current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the owner removed the file as we opened it: lock the new one
        previous = _parse_owner(os.pread(fd, 1 << 16, 0))
        if previous and previous.get("host") != socket.gethostname():
            os.close(fd)
            raise _locked(str(self.path), previous, f"if that process is no longer running, delete {self.path}")
        if previous:
            state = "still exists but no longer holds it" if _pid_alive(int(previous.get("pid", 0))) else "has ended"
            log.warning("%s: taking over the lock of %r (pid %s, since %s): that process %s", self.path,
                        previous.get("command"), previous.get("pid"), previous.get("since"), state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_lock_record(self.command), indent=2).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def _owner(self) -> dict[str, Any]:
        """The holder's record (it writes it just after taking the flock: wait a moment for it)."""
        for _ in range(20):
            try:
                owner = _parse_owner(self.path.read_bytes())
            except FileNotFoundError:
                owner = {}
            if owner:
                return owner
            time.sleep(0.05)
        return {}

    def release(self) -> None:
        self.path.unlink(missing_ok=True)  # before the flock goes, so no one locks a file that is being removed
        os.close(self.fd)


class _ObjectLock:
    """``<uri>/.lock`` in object storage: the owner's record with a heartbeat time, refreshed every ``HEARTBEAT_S``
    by a thread; a lock whose heartbeat is older than ``STALE_S`` was left by a process that is gone and is taken
    over. Object stores give pyarrow no conditional write, so the lock is written, read back after ``SETTLE_S`` and
    kept only if it is still this process's: of two commands starting at once the later writer wins and the other
    fails. The heartbeat thread logs an error if the lock is ever found taken."""

    def __init__(self, uri: str, command: str):
        from pyarrow import fs as pafs

        self.filesystem, base = pafs.FileSystem.from_uri(uri)
        self.path, self.where = _join(base, LOCK_FILE), f"{uri}/{LOCK_FILE}"
        self.record = _lock_record(command)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="lesion-run-lock", daemon=True)

    def read(self) -> dict[str, Any]:
        """The lock object's record (``{}`` when there is none)."""
        from pyarrow import fs as pafs

        if self.filesystem.get_file_info(self.path).type != pafs.FileType.File:
            return {}
        with self.filesystem.open_input_stream(self.path) as stream:
            return _parse_owner(stream.read())

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(json.dumps(self.record, indent=2).encode())

    def _ours(self, owner: dict[str, Any]) -> bool:
        return owner.get("token") == self.record["token"]

    def acquire(self) -> None:
        owner = self.read()
        if owner:
            age = time.time() - float(owner.get("heartbeat", 0))
            if age < STALE_S:
                raise _locked(self.where, owner, f"its last heartbeat was {age:.0f} s ago; a lock without one for "
                                                 f"{STALE_S:.0f} s is taken over")
            log.warning("%s: taking over the lock of %r (pid %s on %s, since %s): no heartbeat for %.0f s",
                        self.where, owner.get("command"), owner.get("pid"), owner.get("host"), owner.get("since"), age)
        self._write()
        time.sleep(SETTLE_S)
        owner = self.read()
        if not self._ours(owner):
            raise _locked(self.where, owner, "it took the lock at the same time as this command")
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                owner = self.read()
                if not self._ours(owner):
                    log.error("%s: this command's lock was taken by %r (pid %s on %s): two commands may now write the "
                              "run", self.where, owner.get("command"), owner.get("pid"), owner.get("host"))
                    return
                self._write()
            except OSError as exc:  # storage briefly unreachable: try again at the next beat
                log.warning("%s: cannot refresh the lock's heartbeat: %s", self.where, exc)

    def release(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if self._ours(self.read()):
            self.filesystem.delete_file(self.path)


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names remote storage (``scheme://...``) rather than a local path (``file://`` is local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def staging_dir(uri: str) -> Path:
    """The local folder that mirrors the remote run ``uri``."""
    cache = Path(os.environ.get("LESION_CACHE", "~/.cache/lesion")).expanduser()
    return cache / "runs" / hashlib.sha256(uri.encode()).hexdigest()[:16]


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
        remote, base = self._remote()
        copied = _mirror(remote, base, _local_fs(), str(self.root), "", remote_is_source=True)
        log.info("pulled %d file(s) from %s to %s", copied, self.uri, self.root)
        self.manifest()  # a run this lesion cannot read fails here, before any stage starts
        return copied

    def push(self, *parts: str) -> int:
        """Mirror ``parts`` of the run (relative paths; all of it when none) to the remote run; returns files copied.

        ``manifest.json`` and ``config.yaml`` always go along. Remote files under a pushed part that no longer exist
        locally are deleted, so a re-made artefact does not keep stale files. Pushes from threads of one process
        (the workflow's nodes) take turns.
        """
        if not self.is_remote:
            return 0
        remote, base = self._remote()
        copied = 0
        with _PUSH_LOCK:
            for part in parts or ("",):
                part = part.strip("/")
                copied += _mirror(_local_fs(), _join(str(self.root), part), remote, _join(base, part), part,
                                  remote_is_source=False)
            for name in ("manifest.json", "config.yaml") if parts else ():
                if (self.root / name).is_file():
                    copied += _mirror(_local_fs(), str(self.root / name), remote, _join(base, name), name,
                                      remote_is_source=False)
        log.info("pushed %d file(s) from %s to %s", copied, self.root, self.uri)
        return copied

    def _remote(self):
        from pyarrow import fs as pafs

        return pafs.FileSystem.from_uri(self.uri)

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
        self.root.mkdir(parents=True, exist_ok=True)
        with _flocked(self.root / MANIFEST_LOCK):
            entries = self.manifest()
            entries[artefact] = {
                "command": " ".join(sys.argv),
                "config": config,
                "fingerprint": fingerprint,
                "versions": package_versions(),
                "time": _now(),
                **extra,
            }
            write_atomic(self.manifest_path, json.dumps({"format": RUN_FORMAT, "artefacts": entries}, indent=2,
                                                        default=str))

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Make this process the run's only writer for the block (``command`` names it to others).

        A local run gets ``RUN/.lock`` (pid, host, command, start time; a lock left by a process of this host that
        has ended is taken over, with a log line); a remote run a lock object with a heartbeat (``_ObjectLock``).
        Raises ``RunLockedError`` naming the owner when another process holds it. Temporary files left in the run
        by a crashed writer are removed once the lock is held.
        """
        held = _ObjectLock(self.uri, command) if self.is_remote else _FileLock(self.root / LOCK_FILE, command)
        held.acquire()
        try:
            remove_stale_temp_files(self.root)
            yield
        finally:
            held.release()

    def is_current(self, artefact: str, fingerprint: str) -> bool:
        """Whether ``artefact`` was already made with this fingerprint (so the stage can be skipped)."""
        return self.manifest().get(artefact, {}).get("fingerprint") == fingerprint


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


def _is_ray_storage(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, f"{pattern}/*") for pattern in RAY_STORAGE)


def _is_synced(path: str) -> bool:
    """Whether a run-relative path is mirrored between a remote run and its staging copy."""
    return not (_is_ray_storage(path) or path in LOCAL_ONLY or is_temp_file(path.rpartition("/")[2]))


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
