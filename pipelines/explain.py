"""``lesion explain``: predict one image with a trained model (or the ensemble) and write its Grad-CAM overlay PNG.

No Ray here: the explanation runs in this process (``lesion.explain``), the same code the served Grad-CAM
deployment calls.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

from lesion.config import load_config
from lesion.explain import ENSEMBLE, METHODS, load_explainer
from lesion.rundir import RunDir

log = logging.getLogger(__name__)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory with trained models")
    parser.add_argument("--config", help="config file whose data section says how to preprocess "
                                         "(default: RUN/config.yaml, as at ingest)")
    parser.add_argument("--image", required=True, help="image file (JPEG, PNG, ...) to explain")
    parser.add_argument("--model", default=ENSEMBLE, help=f"a trained model of the run, or {ENSEMBLE!r} (default)")
    parser.add_argument("--method", default="gradcam", choices=list(METHODS), help="explanation method")
    parser.add_argument("--out", help="overlay PNG to write (default: RUN/eval/explain/<image>-<model>-<method>.png)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def run_command(name: str, args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    trained = run.trained_models()
    if not trained:
        raise FileNotFoundError(f"no trained models under {run.models}: run `lesion train --run {run.root}` first")
    if args.model != ENSEMBLE and args.model not in trained:
        raise ValueError(f"model {args.model!r} is not trained in {run.root}; trained models: {', '.join(trained)} "
                         f"(or {ENSEMBLE!r})")
    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"image file not found: {image}")
    config = load_config(args.config) if args.config else None
    models = None if args.model == ENSEMBLE else [args.model]
    explainer = load_explainer(run.root, models, device=args.device, config=config)
    prediction, picture = explainer.explain(image, args.model, args.method)

    out = Path(args.out) if args.out else run.eval / "explain" / f"{image.stem}-{args.model}-{args.method}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out)

    probabilities = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])
    calibrated = " (calibrated)" if prediction["calibrated"] else ""
    print(f"{image}: {prediction['predicted_class']} by {args.model}{calibrated}")
    members = prediction["models"] if args.model == ENSEMBLE else {}
    header = f"  {'class':<10} {args.model:>10}" + "".join(f" {name:>18}" for name in members)
    print(header)
    for cls, p in probabilities:
        print(f"  {cls:<10} {p:>10.3f}" + "".join(f" {probs[cls]:>18.3f}" for probs in members.values()))
    if "weights" in prediction:
        print("  weights: " + ", ".join(f"{n} {w:.3f}" for n, w in prediction["weights"].items()))
    print(f"{args.method} overlay ({picture.shape[1]}x{picture.shape[0]}, explains "
          f"{prediction['predicted_class']}): {out}")
    return 0
