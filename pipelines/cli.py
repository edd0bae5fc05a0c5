"""The ``lesion`` command line: one sub-command per stage, each defined next to the stage it runs.

Every stage module in ``pipelines/`` that appears in ``COMMANDS`` defines ``add_arguments(name, parser)`` and
``run_command(name, args) -> int``. Modules are imported only for the command being run, so ``lesion --help`` stays
fast and Ray is loaded only when a command needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lesion.config import ConfigError
from lesion.rundir import RunLockedError
from pipelines import tracking
from pipelines.capacity import CapacityError

# command -> (module in pipelines/, one-line help)
COMMANDS = {
    "ingest": ("ingest", "read a data set, split it by lesion, preprocess it with Ray Data into RUN_DIR/data/"),
    "data": ("ingest", "inspect ingested data (`lesion data summary`)"),
    "download": ("download", "download HAM10000 from its official source (needs internet)"),
    "weights": ("weights", "download the ImageNet weights a config needs, for an air-gapped cluster "
                           "(`lesion weights fetch`)"),
    "train": ("train", "train a model (or --all) with Ray Train"),
    "tune": ("tune", "tune the custom CNN with Ray Tune + Optuna"),
    "evaluate": ("evaluate", "score trained models and the ensemble; write metrics, plots and report.html"),
    "predict": ("predict", "predict images offline, or through a served API with --url"),
    "explain": ("explain", "write a Grad-CAM overlay for one image"),
    "serve": ("serve", "serve the trained ensemble with Ray Serve (HTTP API + web page)"),
    "run": ("workflow", "run the whole workflow: ingest, tune, train, evaluate (and serve)"),
    "status": ("status", "show the stage table of a `lesion run` in progress or done (`lesion status --run RUN`)"),
    "cluster": ("local_cluster", "start or stop a local multi-node Ray cluster (`lesion cluster up|down`)"),
    "register": ("register", "register a run's ensemble as an MLflow model version, or move an alias"),
    "calibrate": ("calibrate", "adapt a run's ensemble to another site's dermatoscope (`--site NAME` uses it)"),
    "export": ("export", "export a run's ensemble as a bundle: ONNX / torch.export members, parity-checked"),
    "verify": ("export", "check an export bundle's checksums and re-run its samples"),
    "config": ("config_cmd", "show a run's effective config and where each value came from, or change it "
                             "(`lesion config show|set`)"),
}

# commands whose flags change only their own behaviour, unless --save-config records them as the run's config
SAVES_CONFIG = ("train", "tune", "evaluate", "predict", "explain", "serve")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="lesion", description="Train, tune, explain and serve skin-lesion classifiers on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"pipelines.{module_name}")
            module.add_arguments(name, sub_parser)
            if name in tracking.TRACKED_COMMANDS:
                tracking.add_tracking_argument(sub_parser)
            if name in SAVES_CONFIG:
                sub_parser.add_argument("--save-config", action="store_true",
                                        help="record this command's effective config (file + flags) as RUN/config.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lesion`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"pipelines.{COMMANDS[args.command][0]}")
    try:
        with tracking.command_run(args.command, args):
            return module.run_command(args.command, args) or 0
    except (ConfigError, CapacityError, FileNotFoundError, ValueError, RunLockedError) as exc:
        print(f"lesion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
