"""``manifest.json``: what made each artefact of a run, and the run directory's format (``RUN_FORMAT``).

A run written by an older lesion (format 1: a manifest without a format field) is migrated when it is read; a run
written by a newer lesion is refused with a message, never misread. An entry is recorded after all of its
artefact's files, under an exclusive lock, and the manifest is replaced atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lesion.rundir.atomic import write_atomic
from lesion.rundir.fingerprints import package_versions, utc_now
from lesion.rundir.locks import MANIFEST_LOCK, flocked

RUN_FORMAT = 2  # bump when the run directory's layout or manifest changes; add the migration to _migrate
_RUN_COMMAND = "lesion run --run {run}"  # what re-makes a run whose format cannot be migrated


class RunFormatError(ValueError):
    """A run directory this lesion cannot read: written by a newer lesion, or with a malformed manifest."""

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


def record_entry(path: Path, run: str, artefact: str, *, config: Any, fingerprint: str, **extra: Any) -> None:
    """Record in the manifest at ``path`` what made ``artefact``: command line, config, fingerprint, versions, time.

    The read-modify-write holds an exclusive lock (``MANIFEST_LOCK`` beside the manifest), so trainings of one run
    finishing at once lose no entry, and the manifest is replaced atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(path.parent / MANIFEST_LOCK):
        entries = read_manifest(path, run)
        entries[artefact] = {
            "command": " ".join(sys.argv),
            "config": config,
            "fingerprint": fingerprint,
            "versions": package_versions(),
            "time": utc_now(),
            **extra,
        }
        write_atomic(path, json.dumps({"format": RUN_FORMAT, "artefacts": entries}, indent=2, default=str))
