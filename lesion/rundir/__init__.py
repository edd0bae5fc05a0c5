"""The run directory: where every artefact of a workflow run lives, and the manifest that says what made each.

A run directory is a local path (a mounted NFS share included) or a URI that pyarrow understands (``s3://bucket/run``,
``gs://bucket/run``), worked on through a local staging copy. One module per job:

- ``layout``: ``RunDir``, the paths of a run and what a command does with it;
- ``manifest``: ``manifest.json``, its format (``RUN_FORMAT``) and the migration of older runs;
- ``locks``: the run's one-writer lock (a file, or an object with a heartbeat) and the manifest's lock;
- ``sync``: pulling a remote run into its staging copy and pushing finished artefacts back;
- ``atomic``: crash-safe writes (a reader sees the old file or the new one, never a part);
- ``fingerprints``: what artefacts are keyed by (input hashes, changed settings, package versions).
"""

from lesion.rundir.atomic import TEMP_MARK, atomic_path, is_temp_file, write_atomic
from lesion.rundir.fingerprints import changed_settings, fingerprint, package_versions
from lesion.rundir.layout import RunDir, remove_stale_temp_files
from lesion.rundir.locks import HEARTBEAT_S, LOCK_FILE, MANIFEST_LOCK, SETTLE_S, STALE_S, RunLockedError
from lesion.rundir.manifest import RUN_FORMAT, RunFormatError, read_manifest
from lesion.rundir.sync import LOCAL_ONLY, RAY_STORAGE, filesystem_of, is_uri, remove_tree, staging_dir

__all__ = [
    "HEARTBEAT_S", "LOCAL_ONLY", "LOCK_FILE", "MANIFEST_LOCK", "RAY_STORAGE", "RUN_FORMAT", "SETTLE_S", "STALE_S",
    "TEMP_MARK", "RunDir", "RunFormatError", "RunLockedError", "atomic_path", "changed_settings", "filesystem_of",
    "fingerprint", "is_temp_file", "is_uri", "package_versions", "read_manifest", "remove_stale_temp_files",
    "remove_tree", "staging_dir", "write_atomic",
]
