"""What every benchmark shares: the machine it ran on, its result file (``benchmarks/results/<name>.json``, rendered
by the docs' results page) and memory measured from /proc."""

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def save_result(name: str, result: dict) -> Path:
    """Write ``result`` to ``benchmarks/results/<name>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def interval(block: dict | None) -> list[float] | None:
    """[estimate, low, high] of a bootstrap entry of metrics.json, rounded; None when absent."""
    if not block:
        return None
    return [round(block[key], 3) for key in ("estimate", "low", "high")]


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (Linux /proc): a local Ray's GCS, raylet and workers too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_bytes(pids: list[int], kind: str = "pss") -> int:
    """Summed memory of ``pids`` from /proc (Linux): ``pss``, the proportional set size (shared pages split between
    their users, so a sum over processes counts memory once; /proc/PID/smaps_rollup), or ``rss``, resident memory
    (VmRSS of /proc/PID/status)."""
    name, field = {"pss": ("smaps_rollup", "Pss:"), "rss": ("status", "VmRSS:")}[kind]
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            pass  # ended, or not ours to read
    return total


class PeakMemory:
    """``with PeakMemory() as memory: ...`` samples the memory (PSS) of the processes ``pids()`` names (default: this
    process and all its descendants); ``memory.peak_mb`` is the highest total seen.

    Reading PSS makes the kernel walk each process's page tables, which costs far more for a local Ray's many
    processes than for a one-process peer: a fixed interval would slow the Ray set-ups it measures
    (docs/decisions.md). The sampler therefore waits ``overhead`` times its own last sample's CPU time between
    samples (at least ``interval``), at the lowest scheduling priority: it takes at most about 1 / ``overhead`` of
    one core whatever it measures."""

    def __init__(self, interval: float = 0.2, pids: Callable[[], list[int]] | None = None, overhead: float = 20.0):
        self.interval, self.overhead, self.peak = interval, overhead, 0
        self.pids = pids or (lambda: process_tree(os.getpid()))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        while True:
            started = time.thread_time()
            self.peak = max(self.peak, memory_bytes(self.pids()))
            if self._stop.wait(max(self.interval, self.overhead * (time.thread_time() - started))):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)
