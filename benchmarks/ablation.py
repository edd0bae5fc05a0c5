"""A recipe ablation's table: each change against its baseline, on the validation split, paired over lesions.

Reads the evaluation of a study whose variants differ by one change each
(``benchmarks/configs/ham10000-ablation.yaml`` run by ``python -m benchmarks.study`` with ``evaluate.split: val``):
per change, the variant's validation balanced accuracy and malignant AUC with their lesion-bootstrap intervals, and the paired difference from its baseline (the same
resampled lesions for both, ``metrics.json`` -> ``comparison``), so a change whose interval excludes 0 is a real
one. A variant trained on the data's own class mix is judged by its raw arg-max there, which the ensemble never
uses: each row also gives both models' balanced accuracy with the ensemble's calibration and logit adjustment fitted
on half of the validation lesions and applied to the other half (cross-fitted, over 5 random halvings). Results go
to ``benchmarks/results/<name>.json``.

    python -m benchmarks.ablation --run RUN --pairs lite0_base:lite0_mixup lite0_base:lite0_warmup ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.shared import interval, save_result
from lesion import ensemble
from lesion.metrics import balanced_accuracy


def difference(comparison: dict, baseline: str, variant: str, metric: str) -> list[float]:
    """variant - baseline of ``metric`` with its paired interval (``comparison`` stores one order of each pair)."""
    differences = comparison["differences"]
    if f"{variant} - {baseline}" in differences:
        block = differences[f"{variant} - {baseline}"][metric]
        return interval(block)
    block = differences[f"{baseline} - {variant}"][metric]
    return [round(-block["estimate"], 3), round(-block["high"], 3), round(-block["low"], 3)]


def adjusted_balanced_accuracy(long: pd.DataFrame, name: str, classes: list[str], task: str,
                               repeats: int = 5) -> list[float]:
    """``name``'s validation balanced accuracy as a one-model ensemble (temperature and logit adjustment) fitted
    on half of the lesions and scored on the other half, both ways, over ``repeats`` random halvings:
    [mean, min, max] over the halvings."""
    labels = long["true_label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    probs = long[[f"{name}:{c}" for c in classes]].to_numpy(np.float64)
    lesions = long["lesion_id"].fillna(long["image_id"]).to_numpy()
    scores = []
    for seed in range(repeats):
        half = np.isin(lesions, np.random.default_rng(seed).permutation(np.unique(lesions))[: len(set(lesions)) // 2])
        adjusted = np.zeros_like(probs)
        for fit_on in (half, ~half):
            spec = ensemble.fit({name: probs[fit_on]}, labels[fit_on], task=task, prior_correction="fit")
            adjusted[~fit_on] = ensemble.combine({name: probs[~fit_on]}, spec)
        scores.append(balanced_accuracy(labels, adjusted))
    return [round(float(np.mean(scores)), 3), round(float(np.min(scores)), 3), round(float(np.max(scores)), 3)]


def rows_of(metrics: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """One row per (baseline, variant) pair."""
    (arch, comparison), = [(a, c) for a, c in metrics["comparison"].items()
                           if all(v in c["variants"] for pair in pairs for v in pair)]
    models = comparison["models"]
    return [{"baseline": base, "variant": variant, "arch": arch,
             **{f"{m}": interval(models[variant][m]) for m in ("balanced_accuracy", "malignant_auc")},
             **{f"{m}_difference": difference(comparison, base, variant, m)
                for m in ("balanced_accuracy", "malignant_auc")}}
            for base, variant in pairs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory of the ablation study (evaluated on val)")
    parser.add_argument("--pairs", nargs="+", required=True, metavar="BASELINE:VARIANT")
    parser.add_argument("--name", default="recipe-ablation", help="results name")
    args = parser.parse_args()
    metrics = json.loads((Path(args.run) / "eval" / "metrics.json").read_text())
    if metrics["split"] != "val":
        raise SystemExit(f"{args.run} was evaluated on {metrics['split']}: an ablation chooses on val only")
    pairs = [tuple(pair.split(":", 1)) for pair in args.pairs]
    long = pd.read_csv(Path(args.run) / "eval" / "predictions_long.csv")
    rows = rows_of(metrics, pairs)
    for row in rows:
        for role in ("variant", "baseline"):
            row[f"{role}_balanced_accuracy_adjusted"] = adjusted_balanced_accuracy(
                long, row[role], metrics["classes"], metrics["task"])
    result = {"name": args.name, "run": args.run, "split": metrics["split"],
              "command": shlex.join(["python", "-m", "benchmarks.ablation", *sys.argv[1:]]),
              "n_lesions": next(iter(metrics["comparison"].values()))["n_groups"], "rows": rows}
    save_result(args.name, result)
    print(f"wrote benchmarks/results/{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
