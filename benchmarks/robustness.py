"""Which recipe survives another dermatoscope: colour constancy x augmentation, chosen on data no figure is reported on.

Reads two runs of ``benchmarks/configs/ham10000-robustness.yaml`` (one per colour constancy, each with the basic
and the dermoscopy augmentation) and scores every (colour constancy, augmentation) candidate on the HAM10000
VALIDATION split (lesion-grouped) and on the PH2 SELECTION half (``lesion evaluate --source ph2-selection``, run
here when missing): malignant AUC and balanced accuracy of each candidate's own probabilities, with paired
lesion-bootstrap differences from the baseline (no colour constancy, basic augmentation; the same resampled images
for both). The rule, fixed before any figure was seen: the candidate with the highest PH2 selection malignant AUC
whose HAM10000 validation malignant AUC is at most 0.01 below the baseline's. The HAM10000 test split and the PH2
report half are never read. Results go to ``benchmarks/results/robustness.json``.

    python -m benchmarks.robustness --runs RUN_NONE RUN_SOG --ph2 ../shared/data/ph2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.shared import cpu_model, interval, save_result
from lesion.config import load_config
from lesion.labels import class_names
from lesion.metrics import paired_bootstrap
from lesion.rundir import RunDir, package_versions

AUGMENTATIONS = {"lite0_basic": "basic", "lite0_dermoscopy": "dermoscopy"}
BASELINE = "none/basic"
MAX_HAM_DROP = 0.01


def external_predictions(run: RunDir, ph2: str) -> Path:
    """``RUN/eval/external/ph2-selection/predictions_long.csv``, evaluating the run on the PH2 selection half first
    when it is missing."""
    from pipelines.common import init_ray
    from pipelines.evaluate import evaluate, ingest_external

    out = run.eval / "external" / f"{Path(ph2).name}-selection" / "predictions_long.csv"
    if not out.is_file():
        init_ray()
        config = load_config(run.root / "config.yaml")
        evaluate(config, run, "all", ingest_external(config, run, "ph2-selection", ph2))
    return out


def candidates(runs: list[RunDir], which: str, ph2: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Every candidate's class probabilities on ``which`` ("val" or "ph2"), the labels and the lesion groups."""
    probs, reference = {}, None
    for run in runs:
        constancy = load_config(run.root / "config.yaml").data.color_constancy
        table = pd.read_csv(run.eval / "predictions_long.csv" if which == "val" else external_predictions(run, ph2))
        table = table.sort_values("image_id").reset_index(drop=True)
        if reference is not None and not table["image_id"].equals(reference["image_id"]):
            raise ValueError(f"{run.root}: scored other images than {runs[0].root} on {which}")
        reference = table
        for model, augmentation in AUGMENTATIONS.items():
            probs[f"{constancy}/{augmentation}"] = table[[f"{model}:{c}" for c in class_names("multiclass")]].to_numpy()
    labels = reference["true_label"].map(class_names("multiclass").index).to_numpy()
    return probs, labels, reference["lesion_id"].fillna(reference["image_id"]).to_numpy()


def rows_of(block: dict, name: str, prefix: str) -> dict:
    """One candidate's figures on one data set (``prefix``), [estimate, low, high], and its paired difference from
    the baseline."""
    own = block["models"][name]
    row = {f"{prefix}_malignant_auc": interval(own["malignant_auc"]),
           f"{prefix}_balanced_accuracy": interval(own["balanced_accuracy"])}
    if name != BASELINE:
        pair = block["differences"][f"{BASELINE} - {name}"]
        flipped = {m: {"estimate": -v["estimate"], "low": -v["high"], "high": -v["low"]} for m, v in pair.items()}
        row[f"{prefix}_malignant_auc_minus_baseline"] = interval(flipped["malignant_auc"])
        row[f"{prefix}_balanced_accuracy_minus_baseline"] = interval(flipped["balanced_accuracy"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="robustness runs (one per colour constancy)")
    parser.add_argument("--ph2", required=True, help="the PH2 folder (metadata.csv, images/)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--name", default="robustness")
    args = parser.parse_args()
    runs = [RunDir(r) for r in args.runs]
    blocks = {}
    for which in ("val", "ph2"):
        probs, labels, groups = candidates(runs, which, args.ph2)
        probs = {BASELINE: probs.pop(BASELINE), **probs}
        blocks[which] = paired_bootstrap(labels, probs, groups, "multiclass", n_resamples=args.resamples)
    names = list(blocks["val"]["models"])
    rows = [{"candidate": name, **rows_of(blocks["val"], name, "ham10000_val"),
             **rows_of(blocks["ph2"], name, "ph2_selection")} for name in names]
    base_auc = blocks["val"]["models"][BASELINE]["malignant_auc"]["estimate"]
    allowed = [r for r in rows if blocks["val"]["models"][r["candidate"]]["malignant_auc"]["estimate"]
               >= base_auc - MAX_HAM_DROP]
    winner = max(allowed, key=lambda r: blocks["ph2"]["models"][r["candidate"]]["malignant_auc"]["estimate"])
    for row in rows:
        row["ratio"] = round(blocks["ph2"]["models"][row["candidate"]]["malignant_auc"]["estimate"]
                             / blocks["ph2"]["models"][BASELINE]["malignant_auc"]["estimate"], 4)
    result = {
        "name": args.name,
        "command": "python -m benchmarks.robustness " + shlex.join(sys.argv[1:]),
        "runs": [str(r.root) for r in runs],
        "rule": f"highest PH2 selection malignant AUC among candidates whose HAM10000 validation malignant AUC is "
                f"at most {MAX_HAM_DROP} below the baseline's ({BASELINE})",
        "winner": winner["candidate"],
        "rows": rows,
        "lesions": {"ham10000_val": blocks["val"]["n_groups"], "ph2_selection": blocks["ph2"]["n_groups"]},
        "device": {"cpu": cpu_model(), "cores": 2, "gpu": None},
        "versions": package_versions(),
    }
    path = save_result(args.name, result)
    for row in rows:
        print(f"{row['candidate']:<26} HAM val mal.AUC {row['ham10000_val_malignant_auc']}  "
              f"PH2 selection mal.AUC {row['ph2_selection_malignant_auc']}  "
              f"diff {row.get('ph2_selection_malignant_auc_minus_baseline', '-')}")
    print(f"winner: {winner['candidate']} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
