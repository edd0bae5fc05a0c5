"""The run directory: where every artefact of a workflow run lives, and the manifest that says what made each.

A run directory is a local path (a mounted NFS share included) or a URI that pyarrow understands (``s3://bucket/run``,
``gs://bucket/run``). For a URI every command works in a local staging folder (``~/.cache/lesion/runs/<hash>``,
``$LESION_CACHE`` overrides ``~/.cache/lesion``): ``pull()`` brings the remote run down and ``push()`` sends finished
artefacts back, file by file, copying only files whose size or modification time differ (as ``aws s3 sync`` does).
``uri`` is the address to hand to Ray (e.g. Ray Train's ``storage_path``) so that every node writes to the same place.
Ray's own storage under a remote run (``RAY_STORAGE``) is written straight to the URI and never synced.

``manifest.json`` carries the run directory's format (``RUN_FORMAT``): a run written by an older lesion (format 1: a
manifest without a format field) is migrated when it is read; a run written by a newer lesion is refused with a
message, never misread.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Folders Ray Train/Tune write straight to a remote run's URI (checkpoints, trial state): pull and push leave them be.
RAY_STORAGE = ("models/*/ray", "tune/ray", "tune/trials")

RUN_FORMAT = 2  # bump when the run directory's layout or manifest changes; add the migration to _migrate
_RUN_COMMAND = "lesion run --run {run}"  # what re-makes a run whose format cannot be migrated

_VERSIONED_PACKAGES = ("lesion", "torch", "torchvision", "timm", "ray", "optuna", "scikit-learn", "pyarrow", "numpy")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, file lists, versions)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
        locally are deleted, so a re-made artefact does not keep stale files.
        """
        if not self.is_remote:
            return 0
        remote, base = self._remote()
        copied = 0
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
        """Record in the manifest what made ``artefact``: command line, config, fingerprint, versions, time."""
        self.root.mkdir(parents=True, exist_ok=True)
        entries = self.manifest()
        entries[artefact] = {
            "command": " ".join(sys.argv),
            "config": config,
            "fingerprint": fingerprint,
            "versions": package_versions(),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"format": RUN_FORMAT, "artefacts": entries}, indent=2, default=str))
        tmp.replace(self.manifest_path)

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


def _mirror(src_fs, src: str, dst_fs, dst: str, part: str, *, remote_is_source: bool) -> int:
    """Make ``dst`` hold exactly the files of ``src`` (``part`` of the run); copy only new files and ones whose size
    or mtime differ. Ray's storage (``RAY_STORAGE``) is left alone on both sides.

    After each copy the local file's mtime is set to the remote object's, so the two sides compare equal next time.
    """
    from pyarrow import fs as pafs

    def synced(files: dict[str, Any]) -> dict[str, Any]:
        return {rel: info for rel, info in files.items() if not _is_ray_storage(_join(part, rel).strip("/"))}

    want, have = synced(_files(src_fs, src)), synced(_files(dst_fs, dst))
    copied = []
    for rel, info in sorted(want.items()):
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
