"""Ingest throughput: images/s of the full per-image work on real 600x450 HAM10000 JPEGs.

The work per image is what ``lesion ingest`` does: read the file, decode, crop the black border, remove hair,
resize to ``data.image_size`` (DataConfig defaults). It is timed four ways, each over the same list of paths (the
full-size images repeated to each of ``--counts``, to show how cost grows with the data):

- Ray Data with 1 and with 2 Ray CPUs: blocks of ``BLOCK_ROWS`` paths through ``pipelines.ingest.map_blocks`` (the
  map that ``lesion ingest`` runs, with its settings) -> iterate, a fresh local
  Ray for each (``pipelines.common.init_ray(num_cpus=N)``, shut down between; its start-up, with a first pass over
  one batch per CPU that starts the worker processes and their imports, is timed separately);
- a plain ``torch.utils.data.DataLoader`` with 1 and with 2 worker processes doing the same work, in batches of
  ``BLOCK_ROWS``.

The four set-ups run interleaved ``--repeats`` times, the engine that goes first alternating between repeats, and
every Ray set-up waits ``SETTLE_S`` after its shutdown: the exiting Ray processes are reaped by PID 1 a few seconds
after ``ray.shutdown()``, work which otherwise fell on whichever set-up was timed next (docs/decisions.md). Each row
reports the median with best and worst (every sample, with the load average when it started, is kept in the JSON) and ``ratio``: its median over the DataLoader's median
with the same number of processes, and the peak memory (PSS) of the whole process tree while it ran (Ray: the
driver and its local cluster; DataLoader: the main process and its workers), as a median over the repeats.

OpenCV is held to one thread per process in both, so N processes means N cores of work. Results go to
``benchmarks/results/ingest.json``.

    python -m benchmarks.ingest [--counts 504 2016] [--repeats 2] [--data ../shared/data/ham10000-fullres]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.shared import PeakMemory, cpu_model, save_result
from lesion.config import DataConfig
from lesion.data.preprocess import decode_image, preprocess
from pipelines.ingest import BLOCK_ROWS, map_blocks

ROOT = Path(__file__).resolve().parents[1]

SETTLE_S = 5.0  # after ray.shutdown(): the exited processes' clean-up must not land on the next timed set-up
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000-fullres"


def process_path(path: str, config: DataConfig) -> np.ndarray:
    """The full per-image ingest work: read + decode + border crop + hair removal + resize."""
    return preprocess(decode_image(path, max_pixels=config.max_image_pixels), config)[0]


def process_batch(batch: pa.Table, config: DataConfig) -> dict:
    cv2.setNumThreads(1)
    return {"image": np.stack([process_path(p, config) for p in batch.column("path").to_pylist()])}


class PathDataset(Dataset):
    def __init__(self, paths: list[str], config: DataConfig):
        self.paths, self.config = paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return process_path(self.paths[index], self.config)


def _one_thread(_worker: int) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def time_dataloader(paths: list[str], config: DataConfig, workers: int) -> dict:
    loader = DataLoader(PathDataset(paths, config), batch_size=BLOCK_ROWS, num_workers=workers,
                        worker_init_fn=_one_thread, collate_fn=np.stack)
    start = time.perf_counter()
    with PeakMemory() as memory:
        images = sum(len(batch) for batch in loader)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "peak_mb": memory.peak_mb}


def time_ray(paths: list[str], config: DataConfig, cpus: int) -> dict:
    import ray

    from pipelines.common import init_ray

    def dataset(items: list[str]):
        table = pa.table({"path": items})
        blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, len(items), BLOCK_ROWS)]
        return map_blocks(ray.data.from_arrow(blocks), process_batch, config=config)

    start = time.perf_counter()
    init_ray(num_cpus=cpus)
    for _ in dataset(paths[:BLOCK_ROWS * cpus]).iter_batches(batch_size=None):  # start-up: the workers start and import
        pass
    startup = time.perf_counter() - start
    try:
        ds = dataset(paths)
        start = time.perf_counter()
        with PeakMemory() as memory:
            images = sum(len(batch["image"]) for batch in ds.iter_batches(batch_size=None))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
        time.sleep(SETTLE_S)
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "peak_mb": memory.peak_mb, "ray_start_s": round(startup, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1008],
                        help="items (the real images repeated); several sizes show how cost grows")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (median, best and worst reported)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/*.jpg")
    args = parser.parse_args()
    files = sorted(str(p) for p in (args.data / "images").glob("*.jpg"))
    if not files:
        print(f"no JPEGs under {args.data / 'images'}: pass --data (the shared ham10000-fullres folder)")
        return 1
    config = DataConfig()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    load_before = [round(x, 2) for x in os.getloadavg()]
    _one_thread(0)
    start = time.perf_counter()
    for path in files:
        process_path(path, config)
    inline_ms = (time.perf_counter() - start) / len(files) * 1000

    samples = []
    ray_start = []
    for repeat in range(args.repeats):
        for count in args.counts:
            paths = [files[i % len(files)] for i in range(count)]
            for n in (1, 2):
                for engine in ("Ray Data", "torch DataLoader")[::1 if repeat % 2 == 0 else -1]:
                    load = round(os.getloadavg()[0], 2)
                    if engine == "Ray Data":
                        sample = time_ray(paths, config, n)
                        ray_start.append(sample.pop("ray_start_s"))
                    else:
                        sample = time_dataloader(paths, config, n)
                    samples.append({"engine": engine, "processes": n, "repeat": repeat, "load_1min": load,
                                    **sample})
                    print(samples[-1], flush=True)
    runs = []
    for count in args.counts:
        for n in (1, 2):
            same = [s for s in samples if s["images"] == count and s["processes"] == n]
            peer = statistics.median(s["images_per_s"] for s in same if s["engine"] == "torch DataLoader")
            for engine in ("Ray Data", "torch DataLoader"):
                rates = [s["images_per_s"] for s in same if s["engine"] == engine]
                runs.append({"engine": engine, "processes": n, "images": count,
                             "images_per_s": round(statistics.median(rates), 1), "best": max(rates),
                             "worst": min(rates), "all_images_per_s": rates,
                             "ratio": round(statistics.median(rates) / peer, 2),
                             "peak_mb": round(statistics.median(s["peak_mb"] for s in same if s["engine"] == engine), 1)})

    import PIL
    import ray

    result = {
        "benchmark": "ingest",
        "command": " ".join(["python -m benchmarks.ingest", *sys.argv[1:]]),
        "counts": args.counts,
        "repeats": args.repeats,
        "distinct_files": len(files),
        "config": {"image_size": config.image_size, "crop_border": config.crop_border,
                   "remove_hair": config.remove_hair, "batch_size": BLOCK_ROWS},
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load_before,
                   "load_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
                     "opencv": cv2.__version__, "pillow": PIL.__version__, "numpy": np.__version__},
        "ms_per_image_inline": round(inline_ms, 1),
        "ray_start_s": ray_start,
        "runs": runs,
        "samples": samples,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_result("ingest", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
