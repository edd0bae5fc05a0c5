"""``lesion explain``: predict one image with the run's inference core and write the Grad-CAM overlay PNG of a trained
model (or of the ensemble).

No Ray here: the explanation runs in this process (``lesion.explain.Explainer`` over ``lesion.inference.Inference``),
the same code the served Grad-CAM deployment calls; the answer is the one /v1/predict gives.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image

from lesion.explain import ENSEMBLE, METHODS, Explainer
from lesion.rundir import RunDir, atomic_path
from pipelines.common import add_model_source_arguments, core_from_args, model_uri_of, models_config

log = logging.getLogger(__name__)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run directory with trained models (or --model-uri)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--image", required=True, help="image file (JPEG, PNG, ...) to explain")
    parser.add_argument("--model", default=ENSEMBLE, help=f"a trained model of the run, or {ENSEMBLE!r} (default)")
    parser.add_argument("--method", default="gradcam", choices=list(METHODS), help="explanation method")
    parser.add_argument("--out", help="overlay PNG to write (default: RUN/eval/explain/<image>-<model>-<method>.png)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON instead of a table")
    add_model_source_arguments(parser)


def print_answer(image: Path, model: str, answer: dict, weights: dict[str, float]) -> None:
    """The explained class, the ensemble's decision and a table of the ensemble's and each model's probabilities."""
    print(f"{image}: {answer['explained_class']} by {model}; ensemble: {answer['predicted_class']}, "
          f"decision {answer['decision']} ({answer['decision_reason']})")
    members = answer["models"]
    print(f"  {'class':<10} {ENSEMBLE:>10}" + "".join(f" {name:>18}" for name in members))
    for cls, p in sorted(answer["probabilities"].items(), key=lambda item: -item[1]):
        print(f"  {cls:<10} {p:>10.3f}" + "".join(f" {probs[cls]:>18.3f}" for probs in members.values()))
    print("  weights: " + ", ".join(f"{n} {w:.3f}" for n, w in weights.items())
          + f"; {'flip TTA' if answer['tta'] else 'single pass'}")


def run_command(name: str, args: argparse.Namespace) -> int:
    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"image file not found: {image}")
    config = models_config(args)
    if config.inference.engine != "torch":
        log.info("Grad-CAM needs gradients: explaining on torch (inference.engine %s is for predictions)",
                 config.inference.engine)
    core = core_from_args(args, config, engine="torch", device=args.device)
    if args.model != ENSEMBLE and args.model not in core.names:
        raise ValueError(f"model {args.model!r} is not trained in {model_uri_of(args)}; members: "
                         f"{', '.join(core.names)} (or {ENSEMBLE!r})")
    answer, picture = Explainer(core).explain(image, args.model, args.method)

    folder = RunDir(args.run).eval / "explain" if args.run else Path("explain")
    out = Path(args.out) if args.out else folder / f"{image.stem}-{args.model}-{args.method}.png"
    with atomic_path(out) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    if args.json:
        print(json.dumps({**answer, "overlay": str(out)}, indent=2))
        return 0
    print_answer(image, args.model, answer, core.spec.weights)
    print(f"{args.method} overlay ({picture.shape[1]}x{picture.shape[0]}, explains "
          f"{answer['explained_class']}): {out}")
    return 0
