"""Fault injection for tests, from the test side: a step hook for the training loop (``pipelines.loop``) that kills
one Ray Train worker once, and the Ray Train file that says a checkpoint has been registered.

This module is pickled by value into the Ray workers (they do not have ``tests/`` on their path).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle

# Ray Train writes this beside the checkpoints once it has registered one (the checkpoint folder appears earlier);
# only a registered checkpoint is resumed from after a restart.
REGISTERED_FILE = "checkpoint_manager_snapshot.json"
REGISTER_TIMEOUT_S = 60

log = logging.getLogger(__name__)


def registered_epoch(snapshot: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train's snapshot file says it has registered (None: none yet)."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None
    return latest["metrics"]["epoch"] if latest else None


@dataclass
class KillWorkerOnce:
    """Step hook: the last worker's process exits after the first step of ``epoch``, once (``marker`` records that
    it happened). It first waits until Ray Train has registered the previous epoch's checkpoint (written to
    ``snapshot``), so that the restarted workers resume from it."""

    epoch: int
    marker: Path
    snapshot: Path

    def __call__(self, *, epoch: int, step: int, rank: int, world_size: int) -> None:
        if epoch != self.epoch or step != 0 or rank != world_size - 1 or self.marker.exists():
            return
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        while epoch > 0 and not self._registered(epoch - 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.marker.touch()
        log.warning("fault injection: worker rank %d exits in epoch %d", rank, epoch)
        os._exit(1)

    def _registered(self, epoch: int) -> bool:
        latest = registered_epoch(self.snapshot)
        return latest is not None and latest >= epoch


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
