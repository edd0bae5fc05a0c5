"""A whole study on real data, end to end on this machine: what the models score and what it costs.

Runs the workflow (``pipelines.workflow.run_workflow``: ingest, tune when configured, train, evaluate) with a study
config on a data root into a run directory (recording the config there, as ``lesion run`` does), then records from
``RUN/eval/metrics.json`` the test-split figures of every model and of the ensemble (the split is grouped by lesion
and never trained, tuned or fitted on): balanced accuracy and malignant-vs-benign AUC with their 95% lesion-
bootstrap intervals, macro AUC, ECE after temperature scaling; the Grad-CAM quality against the data's lesion masks
(CAM energy inside the mask and pointing game next to the chance level, ROAD faithfulness); and each stage's wall
time. Stages already current in the run directory are skipped and say so. Results go to
``benchmarks/results/<name>.json``.

    python -m benchmarks.study --config cluster/configs/ham10000-laptop-unweighted.yaml \\
        --data ../shared/data/ham10000 --run runs/ham10000-laptop [--set train.epochs=12 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks.shared import cpu_model, interval, save_result
from lesion.data.shards import read_info
from lesion.rundir import RunDir, package_versions
from pipelines.common import resolve_config
from pipelines.common import parse_sets
from pipelines.workflow import StageTable, record_workflow_config, run_workflow


def model_rows(metrics: dict) -> dict[str, dict]:
    """The figures of each model (and the ensemble) that the study table shows."""
    rows = {}
    for name, m in metrics["models"].items():
        bootstrap = m.get("bootstrap", {})
        rows[name] = {
            "n": m["n"],
            "accuracy": round(m["accuracy"], 3),
            "balanced_accuracy": interval(bootstrap.get("balanced_accuracy")) or [round(m["balanced_accuracy"], 3)],
            "macro_f1": round(m["macro"]["f1"], 3),
            "macro_auc": round(m["macro"]["auc"], 3) if m["macro"].get("auc") is not None else None,
            "malignant_auc": interval(bootstrap.get("malignant_auc")),
            "sensitivity_at_90_specificity": m.get("binary", {}).get("sensitivity_at_90_specificity"),
            "ece_before": m.get("calibration", {}).get("ece_before"),
            "ece_after": m.get("calibration", {}).get("ece_after"),
            "pretrained": m.get("pretrained"),
        }
    return rows


def explanation_rows(metrics: dict) -> list[dict]:
    """One row per (model, CAM method) of the explanation-quality block."""
    block = metrics.get("explanations", {})
    rows = []
    for name, methods in block.get("models", {}).items():
        for method, scores in methods.items():
            rows.append({"model": name, "method": method,
                         **{key: scores.get(key) for key in ("n_images", "energy_inside", "mask_share",
                                                             "pointing_game", "road", "confidence_change")}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="study config, e.g. cluster/configs/ham10000-laptop-unweighted.yaml")
    parser.add_argument("--data", required=True, help="data root (sets data.root)")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--name", help="results name (default: the config file's stem)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    args = parser.parse_args()
    name = args.name or Path(args.config).stem

    run = RunDir(args.run)
    overrides = {"data.root": str(Path(args.data).resolve()), **parse_sets(args.set)}
    config = resolve_config(run, args.config, overrides)
    record_workflow_config(run, config, args.config)  # as `lesion run` does: later commands on RUN see this config
    load_before = [round(x, 2) for x in os.getloadavg()]
    table = StageTable(f"study {name}: {run.uri}")
    started = time.perf_counter()
    try:
        run_workflow(config, run, table)
    finally:
        print(table.summary(), flush=True)
    total = time.perf_counter() - started

    metrics = json.loads((run.eval / "metrics.json").read_text())
    info = read_info(run.root)
    result = {
        "name": name,
        "config": args.config,
        "command": shlex.join(["python", "-m", "benchmarks.study", *sys.argv[1:]]),
        "split": metrics["split"],
        "data": {"root": config.data.root, "num_images": info.num_images, "image_size": info.image_size,
                 "splits": ", ".join(f"{split} {info.split_rows(split)}" for split in info.counts)},
        "models": model_rows(metrics),
        "explanations": explanation_rows(metrics),
        "stages": {stage: {"status": row.status, "seconds": row.seconds, "note": row.note}
                   for stage, row in table.rows.items()},
        "total_seconds": round(total, 1),
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "load_before": load_before,
                   "load_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": package_versions(),
    }
    out = save_result(name, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
