"""The documentation site: its generated pages cover what the code has, it builds with warnings as errors, and a
broken link fails that build."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = [sys.executable, "-m", "mkdocs", "build", "--strict"]  # not --quiet: it hides what --strict counts


def _results_page():
    spec = importlib.util.spec_from_file_location("results_page", DOCS / "results_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site_copy(tmp_path: Path) -> Path:
    """docs/ (without generated pages) and mkdocs.yml copied under tmp_path, so a build writes nothing in the tree."""
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("reference", "__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path


def _mkdocs(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(MKDOCS + ["-f", str(site / "mkdocs.yml"), "-d", str(site / "site")], cwd=site,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@pytest.mark.slow  # about 25 s on 2 quiet cores; CI's `make docs` builds the site before the fast tests too
def test_the_site_builds_strict_with_every_command_config_section_route_and_result(tmp_path):
    from lesion.config import config_schema
    from pipelines.cli import COMMANDS

    site = _site_copy(tmp_path)
    reference = site / "docs" / "reference"
    subprocess.run([sys.executable, str(DOCS / "gen.py"), "--out", str(reference)], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=300)
    cli = (reference / "cli.md").read_text()
    assert all(f"## `lesion {name}`" in cli for name in COMMANDS)
    config = (reference / "config.md").read_text()
    assert all(f"## `{section}`" in config for section in config_schema()["properties"])
    api = (reference / "http-api.md").read_text()
    assert "`POST /v1/predict`" in api and "`GET /healthz`" in api
    results = (reference / "results.md").read_text()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert f"### {path.stem}\n" in results, f"{path.name} is missing from the results page"
    assert list((reference / "img").glob("*.png")), "the results page has no plots"

    built = _mkdocs(site)
    assert built.returncode == 0, built.stderr
    assert (site / "site" / "reference" / "results.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    """The site's own link validation settings turn a link to a missing page into a failed build."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    site = {"site_name": "t", "strict": True, "validation": config["validation"], "nav": ["index.md"]}
    (tmp_path / "docs").mkdir()
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(site))
    (tmp_path / "docs" / "index.md").write_text("# t\n\n[a page that exists](index.md)\n")
    assert _mkdocs(tmp_path).returncode == 0
    (tmp_path / "docs" / "index.md").write_text("# t\n\n[gone](guides/missing.md)\n")
    failed = _mkdocs(tmp_path)
    assert failed.returncode != 0 and "missing.md" in failed.stderr + failed.stdout


@pytest.mark.parametrize("shape", ["ratio", "study"])
def test_a_new_benchmark_appears_on_the_results_page_by_its_shape(tmp_path, shape):
    """A benchmark's JSON needs no change to the docs: rows with a ratio become ratio bars, a study's models with
    intervals become error bars, each under the command and machine the JSON records."""
    if shape == "ratio":
        result = {"command": "python -m benchmarks.newbench --fast", "device": {"cpu": "Test CPU", "cores": 2},
                  "rows": [{"setup": "plain", "images_per_s": 10.0, "ratio": 1.0},
                           {"setup": "ray", "images_per_s": 12.5, "ratio": 1.25}]}
    else:
        result = {"command": "python -m benchmarks.study --config X", "device": {"cpu": "Test CPU", "cores": 2},
                  "split": "test", "models": {"a": {"balanced_accuracy": [0.7, 0.65, 0.75], "malignant_auc":
                                                    [0.9, 0.88, 0.92], "n": 100}}}
    (tmp_path / "newbench.json").write_text(json.dumps(result))
    (tmp_path / "img").mkdir()
    page = _results_page().results_page([tmp_path / "newbench.json"], tmp_path / "img")
    assert "### newbench" in page and result["command"] in page and "Test CPU, 2 cores, no GPU" in page
    assert "![newbench](img/newbench.png)" in page and (tmp_path / "img" / "newbench.png").stat().st_size > 1000
    assert ("1.25" in page) if shape == "ratio" else ("0.700 [0.650, 0.750]" in page)
