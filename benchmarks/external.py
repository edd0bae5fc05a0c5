"""External evaluation: ``lesion evaluate --source folder`` on a folder of large JPEGs, end to end.

The folder holds ``--count`` photos of ``--size`` (default 300 of 1022x767, larger than HAM10000's 600x450 and of
another aspect ratio) made from the real full-size HAM10000 JPEGs: each is a random crop (80-100% of the side), a
random flip and a resize of one of them, saved as JPEG (quality 90) under its class folder (``mel/``, ``nv/``, ...),
the layout of the ``folder`` source. The command is what a user runs on an external set: it ingests the folder with
the run's preprocessing (border crop, hair removal, resizing, colour constancy), scores every model and the ensemble
and writes the evaluation with every output the run's ``evaluate`` section asks for (TTA, bootstrap, CAM scoring).
There is no peer: the figure is the wall time of the command, with the parts it logs (ingest, and evaluation's stage
times). Results go to ``benchmarks/results/external.json``.

    python -m benchmarks.external --run RUN [--count 300] [--size 1022x767] [--out /tmp/external]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.shared import cpu_model, save_result
from lesion.rundir import package_versions

ROOT = Path(__file__).resolve().parents[1]

FULLRES = ROOT.parent / "shared" / "data" / "ham10000-fullres"


def make_folder(out: Path, count: int, size: tuple[int, int], seed: int = 0) -> dict[str, int]:
    """Write ``count`` JPEGs of ``size`` (width, height) under ``out/<dx>/``; returns the count per class."""
    import pandas as pd

    meta = pd.read_csv(FULLRES / "metadata.csv")
    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    counts: dict[str, int] = {}
    for k in range(count):
        row = meta.iloc[k % len(meta)]
        img = Image.open(FULLRES / "images" / f"{row['image_id']}.jpg").convert("RGB")
        share = rng.uniform(0.8, 1.0)
        w, h = int(img.width * share), int(img.height * share)
        left, top = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
        img = img.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = out / row["dx"]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"photo_{k:04d}.jpg", quality=90)
        counts[row["dx"]] = counts.get(row["dx"], 0) + 1
    return counts


def stage_seconds(log: str) -> dict[str, float]:
    """The stages of the ``evaluation time: scoring 41.2 s, metrics 3.0 s (total 44.2 s)`` line of the log."""
    line = next((line for line in log.splitlines() if "evaluation time:" in line), "")
    stages = line.split("evaluation time:", 1)[-1].split("(total", 1)[0]
    return {name: float(seconds) for name, seconds in re.findall(r"([a-z][a-z ]*[a-z]) ([\d.]+) s", stages)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory with trained models")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", default="1022x767", help="WIDTHxHEIGHT of the generated photos")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lesion-external"), help="folder to write them to")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    counts = make_folder(args.out, args.count, size)
    command = [str(Path(sys.executable).parent / "lesion"), "evaluate", "--run", args.run, "--source", "folder",
               "--root", str(args.out), "--force"]
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode:
        print(log[-3000:])
        raise SystemExit(f"{shlex.join(command)} exited {done.returncode}")
    stages = stage_seconds(log)
    result = {
        "benchmark": "external",
        "command": "python -m benchmarks.external " + shlex.join(sys.argv[1:]),
        "evaluate_command": shlex.join(["lesion", *command[1:]]),
        "images": args.count, "size": list(size), "counts": counts,
        "seconds": round(seconds, 1),
        "ingest_seconds": round(seconds - sum(stages.values()), 1),
        "evaluate_stages": stages,
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load_before,
                   "load_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": package_versions(),
    }
    save_result("external", result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
