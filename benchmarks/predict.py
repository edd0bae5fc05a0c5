"""Batch prediction benchmark: ``lesion predict`` in one process against Ray Data, on the same images in one run.

    python -m benchmarks.predict --run RUN [--small 64] [--actors 1 2]

RUN is an ingested and trained HAM10000 run (its test split's 1,284 images are read as files from the data root,
listed in a CSV). Each path runs as its own ``lesion predict`` command (a fresh process, as a user runs it) on all the
test images and on the first ``--small`` of them: the two sizes give each path's fixed cost (start-up, loading,
Ray's start and actors) and its cost per image, hence the size above which Ray Data is faster (``crossover``) when
its cost per image is the lower. Ray Data runs with ``--actors`` actors, sharing this machine's cores
(``evaluate.cpus_per_actor`` = cores / actors). Results: ``benchmarks/results/predict.json`` (``ratio``: each row's
images/s over the in-process path's at the same size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.engines import test_files
from benchmarks.shared import cpu_model, save_result
from lesion.config import apply_overrides, dump_yaml, load_config
from lesion.rundir import RunDir


def predict_once(run: RunDir, listing: Path, out: Path, executor: str, config: Path | None) -> dict:
    """One ``lesion predict`` command; its wall time, CPU time and how many images it predicted."""
    command = [sys.executable, "-m", "pipelines.cli", "predict", "--run", str(run.root), str(listing),
               "--executor", executor, "--out", str(out)]
    if config is not None:
        command += ["--config", str(config)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = child.communicate()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {stderr[-2000:]}")
    table = pd.read_csv(out)
    return {"seconds": round(seconds, 2), "predicted": int((table["status"] == "ok").sum()),
            "first_line": next(line for line in stderr.splitlines() if line.startswith("predict: "))}


def fit_line(small: dict, large: dict) -> tuple[float, float]:
    """(fixed seconds, seconds per image) through a path's two sizes."""
    per_image = (large["seconds"] - small["seconds"]) / (large["images"] - small["images"])
    return small["seconds"] - per_image * small["images"], per_image


def crossover(in_process: tuple[float, float], ray: tuple[float, float]) -> int | None:
    """Images above which the Ray Data path is faster; None when its cost per image is not the lower."""
    (a_local, b_local), (a_ray, b_ray) = in_process, ray
    if b_ray >= b_local:
        return None
    return max(0, round((a_ray - a_local) / (b_local - b_ray)))


def run_path(run: RunDir, lists: dict[int, Path], tmp: Path, label: str, executor: str,
             config: Path | None) -> list[dict]:
    rows = []
    for images, listing in lists.items():
        measured = predict_once(run, listing, tmp / f"{label}-{images}.csv", executor, config)
        rows.append({"path": label, "images": images, **measured,
                     "images_per_s": round(images / measured["seconds"], 2), "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="an ingested and trained HAM10000 run")
    parser.add_argument("--small", type=int, default=64, help="images of the small size (default 64)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Ray Data actor counts to measure")
    args = parser.parse_args(argv)
    run = RunDir(args.run)
    files = test_files(run)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        lists = {}
        for count in (args.small, len(files)):
            lists[count] = tmp / f"list-{count}.csv"
            pd.DataFrame({"path": files[:count]}).to_csv(lists[count], index=False)
        predict_once(run, lists[args.small], tmp / "warm-up.csv", "in-process", None)  # fits a stale spec once
        rows += run_path(run, lists, tmp, "in-process", "in-process", None)
        for actors in args.actors:
            config = load_config(run.root / "config.yaml")
            config = apply_overrides(config, {"evaluate.actors": actors, "evaluate.cpus_per_actor": cores / actors / 2,
                                              "evaluate.threads_per_actor": max(1, cores // actors)})
            path = tmp / f"config-{actors}.yaml"
            dump_yaml(config.to_dict(), path)
            rows += run_path(run, lists, tmp, f"ray-data {actors} actor(s)", "ray-data", path)
    fits = {}
    for label in dict.fromkeys(r["path"] for r in rows):
        small, large = (r for r in rows if r["path"] == label)
        fits[label] = fit_line(small, large)
    for row in rows:
        base = next(r for r in rows if r["path"] == "in-process" and r["images"] == row["images"])
        row["ratio"] = round(row["images_per_s"] / base["images_per_s"], 2)
    result = {
        "benchmark": "predict", "command": "python -m benchmarks.predict " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": cores, "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "run": str(run.root), "members": run.trained_models(), "test_images": len(files),
        "rows": rows,
        "fits": {label: {"fixed_s": round(a, 1), "ms_per_image": round(1000 * b, 1)} for label, (a, b) in fits.items()},
        "crossover_images": {label: crossover(fits["in-process"], fit) for label, fit in fits.items()
                             if label != "in-process"},
    }
    print(json.dumps({"fits": result["fits"], "crossover_images": result["crossover_images"]}))
    print(f"results: {save_result('predict', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
