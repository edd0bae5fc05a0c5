"""The two kinds of lock of a run directory: the run's one-writer lock (``RUN/.lock``: a ``fcntl.flock``-ed file
locally, an object with a heartbeat in object storage) and the manifest's short read-modify-write lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lesion.rundir.fingerprints import utc_now

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # the run's one-writer lock (a file, or an object in a remote run)

MANIFEST_LOCK = ".manifest.lock"  # serialises the manifest's read-modify-write
HEARTBEAT_S = 30.0  # a remote lock's owner refreshes it this often ...
STALE_S = 120.0  # ... and a remote lock not refreshed for this long belongs to a process that is gone
SETTLE_S = 1.0  # a new remote lock is read back after this pause (see _ObjectLock)


class RunLockedError(RuntimeError):
    """The run directory is being written by another command (see ``RunDir.lock``)."""

def pid_alive(pid: int) -> bool:
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
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block; waits for other holders."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock

def _lock_record(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": utc_now(),
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

class FileLock:
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
            state = "still exists but no longer holds it" if pid_alive(int(previous.get("pid", 0))) else "has ended"
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

class ObjectLock:
    """``<uri>/.lock`` in object storage: the owner's record with a heartbeat time, refreshed every ``HEARTBEAT_S``
    by a thread; a lock whose heartbeat is older than ``STALE_S`` was left by a process that is gone and is taken
    over. Object stores give pyarrow no conditional write, so the lock is written, read back after ``SETTLE_S`` and
    kept only if it is still this process's: of two commands starting at once the later writer wins and the other
    fails. The heartbeat thread logs an error if the lock is ever found taken."""

    def __init__(self, uri: str, command: str):
        from pyarrow import fs as pafs

        self.filesystem, base = pafs.FileSystem.from_uri(uri)
        self.path, self.where = f"{base.rstrip('/')}/{LOCK_FILE}", f"{uri}/{LOCK_FILE}"
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
