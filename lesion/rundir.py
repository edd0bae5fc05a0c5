"""The run directory: where every artefact of a workflow run lives, and the manifest that says what made each."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

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


class RunDir:
    """Paths of one run: ``data/``, ``tune/``, ``models/<name>/``, ``eval/`` and ``manifest.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

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
        """The manifest: one entry per artefact (``data``, ``models/<name>``, ``tune``, ``eval``)."""
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text())

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
        tmp.write_text(json.dumps(entries, indent=2, default=str))
        tmp.replace(self.manifest_path)

    def is_current(self, artefact: str, fingerprint: str) -> bool:
        """Whether ``artefact`` was already made with this fingerprint (so the stage can be skipped)."""
        return self.manifest().get(artefact, {}).get("fingerprint") == fingerprint
