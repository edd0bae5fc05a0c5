"""Ray Data ingest: synthetic and real HAM10000 end to end, bad input reporting, the fingerprint skip, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import tiny_config
from lesion.config import apply_overrides, load_config
from lesion.data.shards import SHARD_SCHEMA, SPLITS, load_split, read_info, split_files
from lesion.rundir import RunDir
from pipelines import ingest as ingest_module
from pipelines.cli import main
from pipelines.ingest import data_fingerprint, format_counts, ingest, print_summary

ROOT = Path(__file__).resolve().parents[1]


def write_jpeg(path: Path, seed: int, size=(48, 40)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(60, 200, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    return path.read_bytes()


@pytest.mark.timeout(300)
def test_synthetic_ingest_writes_the_shard_format(ingested_run):
    data = ingested_run.data
    info = read_info(ingested_run.root)
    assert info.num_images == 280 and info.rejected == 0 and info.has_masks
    assert list(info.classes) == ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"] and info.image_size == 32
    assert sum(sum(c.values()) for c in info.counts.values()) == 280
    for split in SPLITS:
        assert pq.read_schema(split_files(ingested_run.root, split)[0]).names == SHARD_SCHEMA.names
        arrays = load_split(ingested_run.root, split)
        assert arrays.images.shape[1:] == (32, 32, 3) and arrays.masks is not None
        assert np.bincount(arrays.labels, minlength=7).tolist() == list(info.counts[split].values())
        assert arrays.images.std() > 10  # real pixels, not an empty buffer
        assert 0.02 < arrays.masks.mean() < 0.9
    table = pd.read_csv(data / "split.csv")
    assert len(table) == 280 and table.groupby("lesion_id")["split"].nunique().max() == 1
    assert table["lesion_id"].nunique() < 280  # synthetic lesions with two views stay together
    assert table["image_id"].is_monotonic_increasing  # shards keep the source order (deterministic contents)
    assert (data / "preprocess_examples.png").stat().st_size > 1000
    assert (data / "augment_examples.png").stat().st_size > 1000
    assert pd.read_csv(data / "rejected.csv").empty
    manifest = ingested_run.manifest()["data"]
    assert manifest["fingerprint"] == info.fingerprint and manifest["num_images"] == 280


@pytest.mark.timeout(300)
def test_second_ingest_is_skipped(ingested_run, caplog):
    stamp = (ingested_run.data / "info.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="pipelines.ingest"):
        summary = ingest(tiny_config(), ingested_run)
    assert summary["skipped"] and summary["num_images"] == 280
    assert "unchanged" in caplog.text and "skipping" in caplog.text
    assert (ingested_run.data / "info.json").stat().st_mtime_ns == stamp


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """A binary ImageFolder with good images and every kind of bad file."""
    root = tmp_path / "messy"
    for i in range(8):
        write_jpeg(root / ("benign" if i % 2 else "malignant") / f"good{i}.jpg", i)
    (root / "benign" / "empty.jpg").write_bytes(b"")
    good = write_jpeg(root / "benign" / "tmp.jpg", 99)
    (root / "benign" / "tmp.jpg").unlink()
    (root / "malignant" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "malignant" / "text.png").write_text("this is not a PNG")
    (root / "malignant" / "readme.txt").write_text("notes")
    return root


@pytest.mark.timeout(300)
def test_bad_inputs_are_reported_not_dropped(ray_local, messy_folder, tmp_path, capsys):
    config = apply_overrides(tiny_config(), {"data.source": "folder", "data.root": str(messy_folder),
                                             "data.task": "binary"})
    run = RunDir(tmp_path / "run")
    summary = ingest(config, run)
    assert summary["num_images"] == 8 and summary["rejected"] == 4
    rejected = pd.read_csv(run.data / "rejected.csv")
    reasons = {Path(f).name: r for f, r in zip(rejected["file"], rejected["reason"])}
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "text.png", "readme.txt"}
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "not a decodable image" in reasons["text.png"]
    assert "not an image file" in reasons["readme.txt"]
    assert list(read_info(run.root).classes) == ["benign", "malignant"]
    print_summary(run)
    out = capsys.readouterr().out
    assert "rejected: 4" in out and all(name in out for name in reasons)


@pytest.mark.timeout(300)
def test_nothing_usable_is_a_clear_error(ray_local, tmp_path):
    root = tmp_path / "broken"
    (root / "nv").mkdir(parents=True)
    (root / "nv" / "a.jpg").write_bytes(b"")
    (root / "nv" / "b.jpg").write_bytes(b"GIF89a nonsense")
    config = apply_overrides(tiny_config(), {"data.source": "folder", "data.root": str(root)})
    with pytest.raises(ValueError, match=r"no usable image .* 2 input\(s\) rejected"):
        ingest(config, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "data").exists()


@pytest.fixture
def ham_subset(ham10000, tmp_path) -> Path:
    """400 real HAM10000 images (symlinked) with their masks written as official *_segmentation.png files, and one
    mask of the wrong size."""
    meta = pd.read_csv(ham10000 / "metadata.csv")
    rare = pd.concat([g.head(max(20, round(len(g) * 400 / len(meta)))) for dx, g in meta.groupby("dx") if dx != "nv"])
    subset = pd.concat([rare, meta[meta["dx"] == "nv"].head(400 - len(rare))])
    root = tmp_path / "ham"
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (root / "HAM10000_segmentations_lesion_tschandl").mkdir()
    subset.to_csv(root / "HAM10000_metadata.csv", index=False)
    with np.load(ham10000 / "masks.npz") as npz:
        ids, packed = npz["image_id"], npz["mask"]
    index = {str(i): n for n, i in enumerate(ids)}
    for position, image_id in enumerate(subset["image_id"]):
        os.symlink(ham10000 / "images" / f"{image_id}.jpg", root / "HAM10000_images_part_1" / f"{image_id}.jpg")
        mask = np.unpackbits(packed[index[image_id]], axis=-1)[:, :200].astype(np.uint8) * 255
        if position == 0:
            mask = mask[:100]  # wrong size: the image is kept, the mask reported
        Image.fromarray(mask).save(root / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png")
    return root


@pytest.mark.realdata
@pytest.mark.timeout(300)
def test_real_ham10000_subset(ray_local, ham_subset, tmp_path):
    config = apply_overrides(tiny_config(), {"data.source": "ham10000", "data.root": str(ham_subset)})
    run = RunDir(tmp_path / "run")
    summary = ingest(config, run)
    assert summary["num_images"] == 400 and summary["rejected"] == 1
    rejected = pd.read_csv(run.data / "rejected.csv")
    assert rejected["file"][0].endswith("_segmentation.png") and "image kept without mask" in rejected["reason"][0]
    table = pd.read_csv(run.data / "split.csv")
    assert table.groupby("lesion_id")["split"].nunique().max() == 1
    assert (table.groupby("split")["dx"].nunique() == 7).all()  # every class in every split
    shares = table["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.05 and abs(shares["test"] - 0.15) < 0.05
    without_mask = Path(rejected["file"][0]).name.removesuffix("_segmentation.png")
    for split in SPLITS:
        arrays = load_split(run.root, split)
        assert arrays.images.shape[1:] == (32, 32, 3)
        if without_mask in set(arrays.meta["image_id"]):
            assert arrays.masks is None  # shards.load_split gives masks only when every row of the split has one
        else:
            assert 0.05 < arrays.masks.mean() < 0.9  # real lesion masks, cropped and resized with their images
    assert {"dx_type", "age", "sex", "localization"} <= set(arrays.meta.columns)
    assert arrays.meta["localization"].notna().all()
    assert (run.data / "preprocess_examples.png").is_file()


@pytest.mark.timeout(300)
def test_cli_ingest_and_summary(tmp_path):
    lesion = Path(sys.executable).with_name("lesion")  # the venv running the tests; PYTHONPATH selects this tree
    if not lesion.exists():
        pytest.skip(f"{lesion} not installed (pip install -e .)")
    run = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([str(lesion), "ingest", "--source", "synthetic", "--count", "40", "--image-size", "32",
                             "--run", str(run), "--num-cpus", "1"], capture_output=True, text=True, env=env,
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run / "data" / "info.json").read_text())
    assert format_counts(read_info(run)) in result.stdout and info["num_images"] == 40
    summary = subprocess.run([str(lesion), "data", "summary", "--run", str(run)], capture_output=True, text=True,
                             env=env, timeout=120)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "rejected: 0" in summary.stdout and "synthetic" in summary.stdout and "total" in summary.stdout
    assert "image_size: 32" in (run / "config.yaml").read_text().replace("  ", " ")


def test_fingerprint_follows_inputs_and_version_not_source_text(tmp_path, monkeypatch):
    """Editing ingest's docs or help text re-runs nothing; changing its inputs or bumping INGEST_VERSION does."""
    write_jpeg(tmp_path / "images" / "nv" / "a.jpg", 0)
    data = apply_overrides(tiny_config(), {"data.source": "folder", "data.root": str(tmp_path / "images")}).data
    baseline = data_fingerprint(data)
    source = Path(ingest_module.__file__).read_text()
    edited = source.replace('"""``lesion ingest``', '"""Edited docs. ``lesion ingest``', 1).replace(
        'help="side of the cached square images, in pixels"', 'help="edited help text"')
    assert edited.count("Edited docs") == 1 and "edited help text" in edited
    (tmp_path / "ingest_edited.py").write_text(edited)
    spec = importlib.util.spec_from_file_location("ingest_edited", tmp_path / "ingest_edited.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.data_fingerprint(data) == baseline  # same inputs, same version: the edited copy agrees
    assert data_fingerprint(apply_overrides(tiny_config(), {"data.source": "folder", "data.root": str(
        tmp_path / "images"), "data.image_size": 48}).data) != baseline  # a config change
    write_jpeg(tmp_path / "images" / "nv" / "b.jpg", 1)
    assert data_fingerprint(data) != baseline  # an input change
    (tmp_path / "images" / "nv" / "b.jpg").unlink()
    assert data_fingerprint(data) == baseline
    monkeypatch.setattr(ingest_module, "INGEST_VERSION", ingest_module.INGEST_VERSION + 1)
    assert data_fingerprint(data) != baseline  # a bumped version


@pytest.mark.timeout(300)
def test_ingest_records_the_run_config_only_when_it_creates_the_run(ray_local, tmp_path):
    run = tmp_path / "run"
    assert main(["ingest", "--run", str(run), "--count", "40", "--image-size", "32"]) == 0
    recorded = (run / "config.yaml").read_text()
    assert load_config(run / "config.yaml").data.synthetic_count == 40
    assert main(["ingest", "--run", str(run), "--count", "48", "--image-size", "32"]) == 0
    assert (run / "config.yaml").read_text() == recorded  # a later ingest's flags are its own
    assert read_info(run).num_images == 48  # ... recorded with the data it wrote
    assert RunDir(run).manifest()["data"]["config"]["synthetic_count"] == 48
