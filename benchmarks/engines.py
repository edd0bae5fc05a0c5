"""Engines benchmark: eager torch against ONNX Runtime float and INT8 for the laptop recipe's members
(``cluster/configs/ham10000-laptop-unweighted.yaml``: two EfficientNet-Lite0, 128 and 96 px) with flip TTA.

    python -m benchmarks.engines --run RUN [--bundle BUNDLE] [--threads 2]

(a) The model stage alone on preprocessed images (the input transform, the four flips and the forward passes of
    ``Member.probs``), images/s at batch 1 and 32; target ONNX Runtime >= 1.3x eager torch on 2 cores. Engines run
    in turns (``--rounds``), so a noisy neighbour slows each alike; the median of the rounds is reported.
(b) ``lesion predict`` end to end on the run's test images (files from the data root), images/s and peak memory
    (the child process's maximum resident set) per engine; preprocessing is the same in every engine.

The bundle (``lesion export --run RUN --out BUNDLE --quantize int8``) is made when absent. Results:
``benchmarks/results/engines.json`` (``ratio``: each row's images/s over eager torch's at the same batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.shared import cpu_model, save_result
from lesion.data.shards import load_split, read_info
from lesion.engines import OnnxRuntimeLoader
from lesion.export import export_bundle
from lesion.inference import Member
from lesion.resolve import read_metadata
from lesion.rundir import RunDir

ENGINES = {"torch": None, "onnxruntime float": False, "onnxruntime int8": True}


def member_stage(bundle: Path, threads: int, images: np.ndarray, batches: tuple[int, ...], rounds: int) -> list[dict]:
    """(a): images/s of each member's ``probs`` with flip TTA, per engine and batch size (median of ``rounds``)."""
    meta = read_metadata(bundle)
    torch.set_num_threads(threads)
    rows = []
    for name, entry in meta["members"].items():
        folder = bundle / entry["path"]
        members = {"torch": Member.load(name, folder)}
        for label, int8 in (("onnxruntime float", False), ("onnxruntime int8", True)):
            members[label] = OnnxRuntimeLoader(threads=threads, int8=int8)(name, folder)
        for batch in batches:
            count = batch * max(1, 64 // batch) if batch > 1 else 32
            chunk = images[:count]
            seconds: dict[str, list[float]] = {label: [] for label in members}
            for label, member in members.items():
                member.probs(chunk[:batch], tta=True, batch_size=batch)  # warm-up
            for _ in range(rounds):
                for label, member in members.items():
                    start = time.perf_counter()
                    member.probs(chunk, tta=True, batch_size=batch)
                    seconds[label].append(time.perf_counter() - start)
            base = len(chunk) / float(np.median(seconds["torch"]))
            for label, times in seconds.items():
                speed = len(chunk) / float(np.median(times))
                rows.append({"stage": "model", "member": name, "input_size": entry["checkpoint"]["input_size"],
                             "engine": label, "batch": batch, "images": len(chunk), "tta": "flip (4 passes)",
                             "images_per_s": round(speed, 1), "all_images_per_s": [round(len(chunk) / t, 1)
                                                                                  for t in times],
                             "ratio": round(speed / base, 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def test_files(run: RunDir) -> list[str]:
    """The run's test images as files of its data root (HAM10000: ``images/<image_id>.jpg``)."""
    info = read_info(run.root)
    split = load_split(run.root, "test")
    root = Path(info.root)
    files = [root / "images" / f"{image_id}.jpg" for image_id in split.meta["image_id"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} test images are not files under {root}/images, e.g. {missing[0]}")
    return [str(f) for f in files]


def end_to_end(bundle: Path, files: list[str], engines: list[str]) -> list[dict]:
    """(b): ``lesion predict --model-uri BUNDLE --engine E`` on ``files``; images/s and the child's peak RSS."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "in"
        listing.mkdir()
        for path in files:
            os.symlink(path, listing / Path(path).name)
        for engine in engines:
            command = [sys.executable, "-m", "pipelines.cli", "predict", "--model-uri", str(bundle), "--engine",
                       engine, str(listing), "--out", str(Path(tmp) / f"{engine}.csv")]
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - start
            if status != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read()[-2000:]}")
            rows.append({"stage": "lesion predict", "engine": engine, "images": len(files),
                         "seconds": round(seconds, 1), "images_per_s": round(len(files) / seconds, 2),
                         "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                         "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)})
            print(json.dumps(rows[-1]), flush=True)
    base = next(r["images_per_s"] for r in rows if r["engine"] == "torch")
    for row in rows:
        row["ratio"] = round(row["images_per_s"] / base, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained laptop run (ham10000-laptop-unweighted.yaml)")
    parser.add_argument("--bundle", help="its export bundle with INT8 members (default: RUN/../<run>-bundle)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-end-to-end", action="store_true", help="only (a)")
    parser.add_argument("--note", default="", help="how the run was trained, recorded in the result")
    parser.add_argument("--max-drop", type=float, default=0.01,
                        help="the bundle's INT8 refusal threshold (lesion export --max-drop); raise it only for a "
                             "throughput measurement of a briefly trained run (the drop is recorded either way)")
    args = parser.parse_args(argv)
    run = RunDir(args.run)
    bundle = Path(args.bundle or run.root.parent / f"{run.root.name}-bundle")
    if not bundle.exists():
        export_bundle(run.root, bundle, formats="onnx", quantize="int8", max_drop=args.max_drop)
    images = load_split(run.root, "test").images
    load_before = os.getloadavg()
    rows = member_stage(bundle, args.threads, images, (1, 32), args.rounds)
    if not args.skip_end_to_end:
        rows += end_to_end(bundle, test_files(run), ["torch", "onnxruntime"])
    meta = read_metadata(bundle)
    result = {"benchmark": "engines", "command": "python -m benchmarks.engines " + " ".join(argv or sys.argv[1:]),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                          "load_before": [round(x, 2) for x in load_before],
                          "load_after": [round(x, 2) for x in os.getloadavg()]},
              "versions": meta["exported_with"], "run": str(run.root), "run_note": args.note,
              "members": {n: {"arch": m["checkpoint"]["arch"], "input_size": m["checkpoint"]["input_size"]}
                          for n, m in meta["members"].items()},
              "int8": meta["quantization"], "target": "onnxruntime >= 1.3x eager torch (model stage, 2 cores)",
              "rows": rows, "peak_rss_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                              / 1024, 1)}
    print(f"results: {save_result('engines', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
