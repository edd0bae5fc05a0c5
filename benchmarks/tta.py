"""Multi-scale test-time augmentation against the flip TTA the models are evaluated with, on the validation split.

Each trained model of RUN scores the validation split (lesion-grouped; the split that picks epochs and fits the
ensemble, never the test split) with the four flips at its input size (what ``lesion evaluate`` and serving do), and
with the four flips at three input sizes (input - 16, input, input + 16 px, resized from the cached image) averaged.
Per model: both variants' balanced accuracy and malignant AUC with 95% lesion-bootstrap intervals and the paired
difference (``lesion.metrics.paired_bootstrap``: the same resampled lesions for both). Results go to
``benchmarks/results/tta-scales.json``.

    python -m benchmarks.tta --run RUN [--step 16] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

import numpy as np

from benchmarks.shared import cpu_model, interval, save_result
from lesion.data.shards import load_split
from lesion.inference import Member, predict_proba
from lesion.metrics import paired_bootstrap
from lesion.rundir import RunDir, package_versions


def scale_probs(member: Member, images: np.ndarray, sizes: list[int]) -> np.ndarray:
    """The mean of the flip-TTA probabilities at each input size in ``sizes``."""
    return sum(predict_proba(member.net, dataclasses.replace(member.checkpoint, input_size=size), images, tta=True)
               for size in sizes) / len(sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory with trained models")
    parser.add_argument("--step", type=int, default=16, help="pixels between the three input sizes")
    parser.add_argument("--bootstrap", type=int, default=1000, help="lesion-bootstrap resamples")
    args = parser.parse_args()
    run = RunDir(args.run)
    val = load_split(run.root, "val")
    groups = val.meta["lesion_id"].fillna(val.meta["image_id"]).to_numpy()
    rows = []
    for name in run.trained_models():
        member = Member.load(name, run.model_dir(name))
        size, task = member.checkpoint.input_size, member.checkpoint.task
        probs = {"flips x 3 sizes": scale_probs(member, val.images, [size - args.step, size, size + args.step]),
                 "flips": scale_probs(member, val.images, [size])}
        compared = paired_bootstrap(val.labels, probs, groups, task, args.bootstrap)
        block = compared["differences"]["flips x 3 sizes - flips"]
        rows.append({"model": name, "input_size": size,
                     **{f"{variant}:{m}": interval(compared["models"][variant][m])
                        for variant in probs for m in ("balanced_accuracy", "malignant_auc")},
                     **{f"difference:{m}": interval(block[m]) for m in ("balanced_accuracy", "malignant_auc")}})
        print(rows[-1], flush=True)
    result = {"benchmark": "tta-scales", "command": "python -m benchmarks.tta " + shlex.join(sys.argv[1:]),
              "run": str(run.root), "split": "val", "images": int(len(val.labels)),
              "lesions": int(len(set(groups))), "rows": rows, "cpu": cpu_model(), "versions": package_versions()}
    save_result("tta-scales", result)
    print("wrote benchmarks/results/tta-scales.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
