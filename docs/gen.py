"""Generate the reference pages of the docs site from the code and the benchmark results, so that they cannot drift.

Writes into ``docs/reference/`` (git-ignored; ``make docs`` runs this before ``mkdocs build --strict``):

- ``cli.md``: every ``lesion`` command and flag, from the argument parser (``pipelines.cli.build_parser``);
- ``config.md``: every config field with its type, default, allowed values and description, from
  ``lesion.config.config_schema()`` (the JSON Schema generated from the config dataclasses), and ``config.schema.json``;
- ``http-api.md`` and ``openapi.json``: the HTTP API, from the FastAPI app's OpenAPI schema (``pipelines.api``);
- ``results.md`` and ``img/*.png``: every ``benchmarks/results/*.json``, as tables with the command and the machine,
  and plots made here (ratios against peers as bars, quality with its 95% intervals as error bars).

    python docs/gen.py [--out docs/reference]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from results_page import code, results_page, table  # docs/results_page.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------------- CLI


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-commands by name (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag_rows(parser: argparse.ArgumentParser) -> list[list[str]]:
    """One row per option or positional argument: how to write it (as ``--help`` does), what it does, its default."""
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        meaning = formatter._expand_help(action) if action.help else ""
        if action.choices and "{" not in formatter._format_action_invocation(action):
            meaning += f" (one of {', '.join(map(str, action.choices))})"
        default = action.default if action.default not in (None, argparse.SUPPRESS, False, []) else None
        rows.append([code(formatter._format_action_invocation(action)), meaning,
                     code(default) if default is not None else ""])
    return rows


def _command_section(path: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    """A command's heading, description, usage and flags, then its own sub-commands."""
    parts = [f"{'#' * level} `{path}`\n", (parser.description or "") + "\n",
             "```text\n" + parser.format_usage().replace("usage: ", "").strip() + "\n```\n"]
    rows = _flag_rows(parser)
    if rows:
        parts.append(table(["argument", "meaning", "default"], rows))
    for name, sub in _subcommands(parser).items():
        parts += _command_section(f"{path} {name}", sub, level + 1)
    return parts


def cli_page() -> str:
    """Every command of the ``lesion`` console script, from the parser each command builds."""
    from pipelines.cli import COMMANDS, build_parser

    top = build_parser()
    parts = ["# Command line\n", "Generated from the argument parser (`pipelines/cli.py`); `lesion COMMAND --help` "
             "prints the same. Every command that reads a config takes `--config FILE` and `--run RUN_DIR`; flags "
             "override the file (see [configuration](../concepts/config.md)).\n",
             "```text\n" + top.format_usage().replace("usage: ", "").strip() + "\n```\n",
             table(["command", "what it does"], [[code(f"lesion {n}"), help_text]
                                                 for n, (_, help_text) in COMMANDS.items()])]
    parts += [table(["argument", "meaning", "default"], _flag_rows(top))]
    for name in COMMANDS:
        parts += _command_section(f"lesion {name}", _subcommands(build_parser(name))[name], 2)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- config


def _schema_type(schema: dict) -> str:
    """A field's type in words: integer, number or null, list of string, ..."""
    kind = schema.get("type")
    if kind == "array":
        return "list of " + _schema_type(schema.get("items", {}))
    if isinstance(kind, list):
        return " or ".join(kind)
    if "anyOf" in schema:
        return " or ".join(_schema_type(arm) for arm in schema["anyOf"])
    return kind or "any"


def _schema_allowed(schema: dict) -> str:
    """Allowed values or range, from enum / minimum / maximum (and the same for list items)."""
    if "enum" in schema:
        return ", ".join("null" if v is None else str(v) for v in schema["enum"])
    bounds = []
    for key, sign in (("minimum", ">= "), ("exclusiveMinimum", "> "), ("maximum", "<= "), ("exclusiveMaximum", "< ")):
        if key in schema:
            bounds.append(sign + str(schema[key]))
    if not bounds and isinstance(schema.get("items"), dict):
        inner = _schema_allowed(schema["items"])
        return f"each {inner}" if inner else ""
    return ", ".join(bounds)


def _section_rows(section: dict, prefix: str) -> list[list[str]]:
    rows = []
    for name, field in section["properties"].items():
        default = json.dumps(field["default"]) if "default" in field else ""
        rows.append([code(f"{prefix}.{name}"), _schema_type(field), code(default) if default else "",
                     _schema_allowed(field), field.get("description", "")])
    return rows


def config_page(schema: dict) -> str:
    """One table per config section, from the JSON Schema of the config."""
    parts = ["# Configuration\n", "Generated from `lesion.config.config_schema()`, the JSON Schema of the config "
             "dataclasses in `lesion/config.py` (also written as [config.schema.json](config.schema.json), for "
             "editors that validate YAML; `lesion config schema` prints it). A config file has one section per "
             "stage; every field is optional and defaults to the value below. `--set SECTION.FIELD=VALUE` overrides "
             "one on the command line. How the file, the run's recorded config and flags combine: "
             "[configuration](../concepts/config.md).\n"]
    for name, section in schema["properties"].items():
        parts.append(f"## `{name}`\n")
        parts.append((section.get("description") or "") + "\n")
        parts.append(table(["field", "type", "default", "allowed", "meaning"], _section_rows(section, name)))
        models = section["properties"].get("models", {}).get("additionalProperties")
        if isinstance(models, dict) and "properties" in models:
            parts.append(f"`{name}.models.VARIANT` takes any `{name}` field above (except `models`) for that variant "
                         "only; `arch` names its architecture (default: the variant name).\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ HTTP


def openapi_schema() -> dict:
    """The OpenAPI schema of the HTTP app, built with the default config and no models loaded."""
    from lesion.config import Config
    from lesion.vocabulary import CAM_METHODS
    from pipelines.api import ApiSettings, build_api

    config = Config()
    known = {"data_config": config.data, "models": list(config.train.models), "task": config.data.task,
             "methods": list(CAM_METHODS), "cors_origins": []}
    values = {f.name: known[f.name] if f.name in known else getattr(config.serve, f.name)
              for f in dataclasses.fields(ApiSettings) if f.name in known or hasattr(config.serve, f.name)}
    return build_api(None, ApiSettings(**values)).openapi()


def _ref_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"list of {_ref_name(schema.get('items', {}))}"
    return schema.get("type", "object")


def _operation(path: str, method: str, op: dict) -> list[str]:
    parts = [f"## `{method.upper()} {path}`\n", (op.get("description") or op.get("summary") or "") + "\n"]
    body = op.get("requestBody", {}).get("content", {})
    if body:
        parts.append("Request body: " + ", ".join(code(kind) for kind in body) + ".\n")
    rows = []
    for status, response in op.get("responses", {}).items():
        content = response.get("content", {})
        schema = next(iter(content.values()), {}).get("schema", {}) if content else {}
        rows.append([status, response.get("description", ""), ", ".join(map(code, content)),
                     _ref_name(schema) if schema else ""])
    parts.append(table(["status", "meaning", "content", "schema"], rows))
    return parts


def _component(name: str, schema: dict) -> list[str]:
    rows = []
    for field, spec in schema.get("properties", {}).items():
        kind = _ref_name(spec) if ("$ref" in spec or "items" in spec) else _schema_type(
            {"anyOf": spec["anyOf"]} if "anyOf" in spec else spec)
        rows.append([code(field), kind, "yes" if field in schema.get("required", []) else "",
                     spec.get("description", "")])
    return [f"### `{name}`\n", (schema.get("description") or "") + "\n",
            table(["field", "type", "required", "meaning"], rows) if rows else ""]


def http_page(schema: dict) -> str:
    """Every route of the API with its request and responses, then the schemas of the bodies."""
    parts = ["# HTTP API\n", f"Generated from the OpenAPI schema of the app in `pipelines/api.py` "
             f"({schema['info']['title']} {schema['info']['version']}; the raw schema: "
             "[openapi.json](openapi.json); a running server serves it at `/openapi.json` and Swagger UI at `/docs`). "
             "How to start a server: [serving](../guides/serving.md).\n", (schema["info"].get("description") or "") + "\n"]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts += _operation(path, method, op)
    components = schema.get("components", {}).get("schemas", {})
    if components:
        parts.append("## Schemas\n")
        for name, component in components.items():
            parts += _component(name, component)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "reference"), help="folder for the generated pages")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    from lesion.config import config_schema

    schema = config_schema()
    (out / "config.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    (out / "config.md").write_text(config_page(schema))
    (out / "cli.md").write_text(cli_page())
    api = openapi_schema()
    (out / "openapi.json").write_text(json.dumps(api, indent=2) + "\n")
    (out / "http-api.md").write_text(http_page(api))
    (out / "results.md").write_text(results_page(sorted(RESULTS.glob("*.json")), out / "img"))
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"docs/gen.py: {len(written)} files in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
