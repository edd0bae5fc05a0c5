"""What a run's artefacts are keyed by: a stable hash of a stage's inputs, the settings that differ from their
defaults, and the versions of the packages that shape results."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from typing import Any

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


def utc_now() -> str:
    """The current UTC time, to the second, in ISO 8601 (manifest entries, lock records)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
