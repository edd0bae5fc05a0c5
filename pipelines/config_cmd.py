"""``lesion config show``, ``lesion config set`` and ``lesion config schema``: inspect a run's effective
configuration, change the configuration a run records (``RUN/config.yaml``) explicitly, and print the JSON Schema of
a config file (``lesion.config.config_schema``) for editors that validate YAML.

``show`` resolves the config the way every command does (``pipelines.common.resolve_config``: ``--config`` file, else
the run's recorded config, else the defaults, then ``--set`` flags) and prints each field with where its value came
from; it writes nothing. ``set`` applies ``KEY=VALUE`` assignments to the recorded config, checks the result like any
config file, records it and prints what changed.
"""

from __future__ import annotations

import json
from typing import Any

from lesion.config import Config, apply_overrides, config_schema, flatten, load_config
from lesion.rundir import RunDir
from pipelines.common import RUN_CONFIG, parse_sets, record_run_config, resolve_config_sources

VALUE_WIDTH = 24  # values longer than this push their source column to the right


def add_arguments(name: str, parser) -> None:
    """The ``show``, ``set`` and ``schema`` actions of ``lesion config``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print every effective field and where its value came from",
                              description="print every effective field and where its value came from "
                                          "(default, the run's config.yaml, --config FILE or a flag); writes nothing")
    show.add_argument("--run", required=True, help="run directory")
    show.add_argument("--config", help="YAML config, as a command would be given it (default: RUN/config.yaml)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a flag as a command would be given it, e.g. --set train.epochs=3 (repeatable)")
    change = actions.add_parser("set", help="change the run's recorded config (RUN/config.yaml) and say what changed",
                                description="change the run's recorded config (RUN/config.yaml): every later command "
                                            "without --config uses it; values are read as YAML and checked")
    change.add_argument("--run", required=True, help="run directory")
    change.add_argument("assignments", nargs="+", metavar="KEY=VALUE", help="e.g. train.epochs=3 data.root=/data/x")
    actions.add_parser("schema", help="print the JSON Schema of a config file",
                       description="print the JSON Schema (draft 2020-12) of a config file: every section and field "
                                   "with its type, allowed values, range and default, for editors that validate YAML")


def format_value(value: Any) -> str:
    """A config value as one line: strings bare, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _shown(flat: dict[str, Any], path: str) -> str:
    return format_value(flat[path]) if path in flat else "(unset)"


def show(run: RunDir, config_path: str | None, sets: list[str]) -> str:
    """The effective config of ``run`` under ``config_path`` and ``sets``, one ``path value source`` row per field."""
    config, sources = resolve_config_sources(run, config_path, parse_sets(sets))
    rows = [(path, format_value(value), sources[path]) for path, value in flatten(config.to_dict()).items()]
    widths = [max(len(row[0]) for row in rows), min(VALUE_WIDTH, max(len(row[1]) for row in rows))]
    return "\n".join(f"{path:<{widths[0]}}  {value:<{widths[1]}}  {source}" for path, value, source in rows)


def set_fields(run: RunDir, assignments: list[str]) -> list[str]:
    """Apply ``KEY=VALUE`` assignments to the run's recorded config, record it, and return one line per change."""
    saved = run.root / RUN_CONFIG
    if saved.is_file():
        before = load_config(saved)
    elif run.manifest_path.is_file():
        before = Config()  # a run made before configs were recorded: start from the defaults
    else:
        raise FileNotFoundError(f"{run.root}: not a run directory (no {RUN_CONFIG} or manifest.json); "
                                "create the run with `lesion ingest` or `lesion run`")
    after = apply_overrides(before, parse_sets(assignments))
    old, new = flatten(before.to_dict()), flatten(after.to_dict())
    changes = [f"{path}: {_shown(old, path)} -> {_shown(new, path)}" for path in dict.fromkeys([*old, *new])
               if _shown(old, path) != _shown(new, path)]
    if changes or not saved.is_file():
        record_run_config(run, after)
        run.push(RUN_CONFIG)
    return changes


def run_command(name: str, args) -> int:
    """Run ``lesion config show``, ``set`` or ``schema``."""
    if args.action == "schema":
        print(json.dumps(config_schema(), indent=2))
        return 0
    run = RunDir(args.run)
    run.pull()
    if args.action == "show":
        print(show(run, args.config, args.set))
        return 0
    changes = set_fields(run, args.assignments)
    print(f"{run.root / RUN_CONFIG}: " + (f"{len(changes)} field(s) changed" if changes else "nothing changed"))
    for line in changes:
        print(f"  {line}")
    return 0
