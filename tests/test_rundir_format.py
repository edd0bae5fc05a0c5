"""The run directory's format version: runs of older lesions are migrated when read, newer ones are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lesion.rundir import RUN_FORMAT, RunDir, RunFormatError

FORMAT_1 = {  # a manifest as lesion wrote it before run formats: artefact entries at the top level
    "data": {"command": "lesion ingest", "config": {"source": "synthetic"}, "fingerprint": "d1", "num_images": 280},
    "models/custom_cnn": {"command": "lesion train", "config": {}, "fingerprint": "m1", "run_id": "r1"},
    "tune": {"command": "lesion tune", "config": {}, "fingerprint": "t1", "best_trial": "a"},
    "workflow/tune": {"command": "lesion run", "config": {}, "fingerprint": "w1", "tune_entry": {}},
}


def test_new_manifests_carry_the_format(tmp_path):
    run = RunDir(tmp_path / "run")
    run.record("data", config={}, fingerprint="f")
    document = json.loads(run.manifest_path.read_text())
    assert document["format"] == RUN_FORMAT == 2
    assert set(document["artefacts"]) == {"data"} and run.is_current("data", "f")


def test_an_older_run_is_migrated_when_read(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(FORMAT_1))
    run = RunDir(tmp_path)
    entries = run.manifest()
    assert set(entries) == {"data", "models/custom_cnn", "tune"}  # the workflow's tune record is folded in
    assert entries["data"] == FORMAT_1["data"] and run.is_current("models/custom_cnn", "m1")
    assert json.loads(run.manifest_path.read_text()) == FORMAT_1  # reading writes nothing
    run.record("eval", config={}, fingerprint="e")  # the next record writes the current format
    document = json.loads(run.manifest_path.read_text())
    assert document["format"] == RUN_FORMAT
    assert set(document["artefacts"]) == {"data", "models/custom_cnn", "tune", "eval"}


def test_a_newer_run_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": RUN_FORMAT + 1, "artefacts": {}}))
    with pytest.raises(RunFormatError, match=rf"manifest.json: run format {RUN_FORMAT + 1} is newer than this "
                                             rf"lesion reads \(format {RUN_FORMAT}\).*upgrade lesion"):
        RunDir(tmp_path)
    for bad in ("2", 0, True):
        (tmp_path / "manifest.json").write_text(json.dumps({"format": bad, "artefacts": {}}))
        with pytest.raises(RunFormatError, match=rf"format must be an integer from 1 to {RUN_FORMAT}, got"):
            RunDir(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": RUN_FORMAT, "data": {}}))
    with pytest.raises(RunFormatError, match=rf"expected an object of artefact entries \(format {RUN_FORMAT}\), got None"):
        RunDir(tmp_path)


def test_the_command_line_names_the_problem_instead_of_misreading(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": RUN_FORMAT + 1, "artefacts": {}}))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--run", str(tmp_path), "--model",
                           "custom_cnn"], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"lesion train: error: {tmp_path / 'manifest.json'}: run format {RUN_FORMAT + 1} is newer" in done.stderr
