"""Robustness to another dermatoscope, simulated: a trained run's test images shifted (``lesion.data.shift``) and
scored as an external data set, beside the same images unshifted.

The test split of RUN (grouped by lesion, never trained, tuned or fitted on) is copied from the data root once per
shift into ``--out/<shift>`` (HAM10000 layout), ingested with the run's own preprocessing (so a run made with
``data.color_constancy: shades_of_gray`` corrects the shifted images as it corrected its training images) and scored
by ``lesion evaluate``'s code with the run's ensemble (its TTA and bootstrap settings; no Grad-CAM scoring). Each row:
the ensemble's balanced accuracy and malignant AUC with 95% lesion-bootstrap intervals, melanoma recall (the 7-class
task), and ``ratio`` = the shifted malignant AUC over the clean one. Results go to ``benchmarks/results/<name>.json``.

    python -m benchmarks.shift --run runs/ham10000-laptop --data ../shared/data/ham10000 \\
        --out /tmp/shifted [--shifts colour blur]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.shared import cpu_model, interval, save_result
from lesion.config import apply_overrides
from lesion.data.shift import SHIFTS, write_shifted_ham10000
from lesion.rundir import RunDir, package_versions
from pipelines.common import resolve_config
from pipelines.evaluate import evaluate, ingest_external


def row(shift: str, metrics: dict, seconds: float) -> dict:
    """The ensemble's figures on one (shifted or clean) copy of the test split."""
    ensemble = metrics["models"]["ensemble"]
    melanoma = ensemble["per_class"].get("mel", {})
    return {
        "shift": shift,
        "images": ensemble["n"],
        "balanced_accuracy": interval(ensemble["bootstrap"]["balanced_accuracy"]),
        "malignant_auc": interval(ensemble["bootstrap"]["malignant_auc"]),
        "melanoma_recall": round(melanoma["recall"], 3) if melanoma else None,
        "seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with trained models (its data: HAM10000)")
    parser.add_argument("--data", required=True, help="the HAM10000 folder the run was ingested from")
    parser.add_argument("--out", required=True, help="folder for the shifted copies (one sub-folder per shift)")
    parser.add_argument("--shifts", nargs="+", choices=SHIFTS, default=list(SHIFTS))
    parser.add_argument("--name", help="results name (default: shift-<run folder name>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = RunDir(args.run)
    name = args.name or f"shift-{Path(run.uri).name}"
    config = apply_overrides(resolve_config(run, None, {}), {"evaluate.cam_score_images": 0})
    split = pd.read_csv(run.root / "data" / "split.csv", dtype={"image_id": str})
    test_ids = split.loc[split["split"] == "test", "image_id"].tolist()

    rows = []
    for shift in ["clean", *args.shifts]:
        started = time.perf_counter()
        folder = write_shifted_ham10000(args.data, test_ids, Path(args.out) / shift,
                                        None if shift == "clean" else shift, args.seed)
        data_run = ingest_external(config, run, "ham10000", str(folder))
        rows.append(row(shift, evaluate(config, run, "all", data_run), time.perf_counter() - started))
        print(json.dumps(rows[-1]), flush=True)
    clean_auc = rows[0]["malignant_auc"][0]
    for r in rows:
        r["ratio"] = round(r["malignant_auc"][0] / clean_auc, 3)

    result = {
        "name": name,
        "run": str(run.uri),
        "color_constancy": config.data.color_constancy,
        "command": shlex.join(["python", "-m", "benchmarks.shift", *sys.argv[1:]]),
        "rows": rows,
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None},
        "versions": package_versions(),
    }
    out = save_result(name, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
