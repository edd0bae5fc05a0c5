"""A recipe ablation's table: each change against its baseline, on the validation split, paired over lesions.

Reads the evaluation of a study whose variants differ by one change each (``cluster/configs/ham10000-ablation.yaml``
run by ``benchmarks/study.py`` with ``evaluate.split: val``): per change, the variant's validation balanced accuracy
and malignant AUC with their lesion-bootstrap intervals, and the paired difference from its baseline (the same
resampled lesions for both, ``metrics.json`` -> ``comparison``), so a change whose interval excludes 0 is a real
one. Results go to ``benchmarks/results/<name>.json`` and the ``<name>`` section of ``benchmarks/README.md``.

    .venv/bin/python benchmarks/ablation.py --run RUN --pairs lite0_base:lite0_mixup lite0_base:lite0_warmup ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from shared import fmt, interval, save_result, write_section  # benchmarks/shared.py, beside this script


def difference(comparison: dict, baseline: str, variant: str, metric: str) -> list[float]:
    """variant - baseline of ``metric`` with its paired interval (``comparison`` stores one order of each pair)."""
    differences = comparison["differences"]
    if f"{variant} - {baseline}" in differences:
        block = differences[f"{variant} - {baseline}"][metric]
        return interval(block)
    block = differences[f"{baseline} - {variant}"][metric]
    return [round(-block["estimate"], 3), round(-block["high"], 3), round(-block["low"], 3)]


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
    result = {"name": args.name, "run": args.run, "split": metrics["split"],
              "command": shlex.join(["python", "benchmarks/ablation.py", *sys.argv[1:]]),
              "n_lesions": next(iter(metrics["comparison"].values()))["n_groups"], "rows": rows_of(metrics, pairs)}
    save_result(args.name, result)
    table = "\n".join(
        f"| {r['variant']} | {r['baseline']} | {fmt(r['balanced_accuracy'])} | {fmt(r['balanced_accuracy_difference'])} | "
        f"{fmt(r['malignant_auc'])} | {fmt(r['malignant_auc_difference'])} |" for r in result["rows"])
    write_section(args.name, f"""## Recipe ablation (`benchmarks/ablation.py`)

Each change against its baseline on the **validation** split ({result['n_lesions']} lesions), with flip TTA as
evaluated: the variant's balanced accuracy and malignant AUC [95% lesion-bootstrap interval] and its paired
difference from the baseline (variant - baseline, the same resampled lesions for both: an interval that excludes 0
is a real difference). Command: `{result['command']}`.

| variant | baseline | balanced accuracy | difference | malignant AUC | difference |
|---|---|---|---|---|---|
{table}
""")
    print(f"wrote benchmarks/results/{args.name}.json and its section of benchmarks/README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
