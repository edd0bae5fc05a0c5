"""``lesion export`` and ``lesion verify``: a run's ensemble as a self-describing bundle, and its check.

- ``lesion export --run RUN --out DIR [--format onnx|pt2|both] [--quantize int8] [--max-drop 0.01]`` writes the
  bundle (``lesion.export.export_bundle``): ONNX and/or ``torch.export`` members checked against eager torch on the
  run's test images, the model card, the reference preprocessing script and samples with their expected answers.
- ``lesion verify BUNDLE`` re-checks every checksum and re-runs the samples on every engine they were recorded with.

No Ray here: exporting runs in this process.
"""

from __future__ import annotations

import argparse
import json

from lesion.export import EXPORT_FORMATS, ExportError, export_bundle, verify_bundle
from lesion.rundir import RunDir
from pipelines.common import resolve_config


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "verify":
        parser.add_argument("bundle", metavar="BUNDLE", help="export bundle folder (lesion export --out)")
        return
    parser.add_argument("--run", required=True, help="run directory with trained (and evaluated) models")
    parser.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--format", default="onnx", choices=EXPORT_FORMATS,
                        help="ONNX (opset 18, dynamic batch), torch.export (.pt2), or both (default onnx)")
    parser.add_argument("--quantize", choices=("int8",), help="add INT8 ONNX members (static, calibrated on "
                                                              "training images), checked on validation")
    parser.add_argument("--max-drop", type=float, default=0.01,
                        help="refuse INT8 when validation balanced accuracy drops by more than this (default 0.01)")


def run_command(name: str, args: argparse.Namespace) -> int:
    try:
        if name == "verify":
            report = verify_bundle(args.bundle)
            print(json.dumps(report, indent=2))
            print(f"{args.bundle}: every checksum and sample answer matches")
            return 0
        run = RunDir(args.run)
        meta = export_bundle(run.root, args.out, resolve_config(run, args.config), formats=args.format,
                             quantize=args.quantize, max_drop=args.max_drop)
    except ExportError as exc:
        print(f"lesion {name}: error: {exc}")
        return 1
    print(json.dumps({"bundle": args.out, "members": list(meta["members"]), "parity": meta["parity"],
                      "quantization": meta["quantization"], "warnings": meta["warnings"]}, indent=2))
    return 0
