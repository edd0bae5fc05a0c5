"""Golden test of ingest: a tiny fixed data set (HAM10000 layout, drawn here with integer arithmetic and written as
lossless PNG, so no random generator or JPEG codec version can change it) goes through ``ingest``; the decoded shard
contents (split, ids, labels, metadata, pixels, masks) are hashed and compared with the hash recorded for the current
``INGEST_VERSION``. A change to the readers, the split, the preprocessing or the shard format that changes the output
fails here until INGEST_VERSION is bumped (so every run ingests again) and the new hash is recorded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesion.config import config_from_dict
from lesion.data.shards import SPLITS, load_split
from lesion.labels import DX_CLASSES
from lesion.rundir import RunDir
from pipelines.ingest import INGEST_VERSION, ingest

# INGEST_VERSION -> sha256 of the decoded shard contents of the golden data set
GOLDEN = {1: "35a6f611882f7f8e81220eacd43ac47bc82cd84dc453816e2fd2aecfd5d39dfa",
          2: "be9bb679ae70f6b68284fddad2c30e5988df2fb77b29443da4133844d8e522fa"}  # aspect-kept resize, min side
LESIONS_PER_CLASS = 5  # 35 lesions, every third with a second view: 47 images, more than one Ray Data block
HEIGHT, WIDTH = 48, 64
LESION_RGB = ((70, 40, 35), (120, 80, 60), (170, 110, 120), (150, 90, 70), (110, 90, 70), (130, 100, 90),
              (150, 40, 60))  # one per class, in DX_CLASSES order


def draw(index: int, label: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB skin image with an elliptical lesion (and its mask), hair on every third image and a black round
    dermatoscope border on every other one; every parameter is integer arithmetic on ``index``."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.empty((HEIGHT, WIDTH, 3), np.int64)
    image[...] = (205 - index % 11, 160 + index % 7, 140 + index % 5)
    image += ((xx * 12) // WIDTH)[..., None]  # a gentle lighting gradient
    cy, cx = HEIGHT // 2 + index % 5 - 2, WIDTH // 2 + index % 7 - 3
    ry, rx = 8 + index % 6, 11 + index % 8
    mask = (yy - cy) ** 2 * rx**2 + (xx - cx) ** 2 * ry**2 <= (rx * ry) ** 2
    image[mask] = LESION_RGB[label]
    image[mask & ((xx + yy + index) % 9 == 0)] -= 25  # texture inside the lesion
    if index % 3 == 0:
        for k in range(3):  # thin dark hairs across the image
            image[np.abs(yy * (k + 2) - xx - 9 * k - index % 13) < 2] = (25, 20, 18)
    if index % 2 == 0:
        radius2 = (HEIGHT // 2 + 10) ** 2
        image[(yy - HEIGHT // 2) ** 2 + (xx - WIDTH // 2) ** 2 > radius2] = 0  # round field of view
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_golden_dataset(root: Path) -> Path:
    """The golden data set in HAM10000's layout: metadata.csv, images/<id>.png, masks/<id>_segmentation.png."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, index = [], 0
    for label, dx in enumerate(DX_CLASSES):
        for lesion in range(LESIONS_PER_CLASS):
            for view in range(2 if (label + lesion) % 3 == 0 else 1):
                image_id = f"GOLD_{index:04d}"
                image, mask = draw(index, label)
                Image.fromarray(image).save(root / "images" / f"{image_id}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{image_id}_segmentation.png")
                rows.append({"lesion_id": f"LES_{label}_{lesion}", "image_id": image_id, "dx": dx,
                             "dx_type": "histo", "age": 30 + index % 50, "sex": ("male", "female")[index % 2],
                             "localization": ("back", "face", "trunk")[index % 3]})
                index += 1
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def shard_digest(run_root: Path) -> str:
    """sha256 of what the shards decode to, split by split: ids, labels, metadata, pixels and masks (not file
    bytes, which depend on the Parquet writer's version)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        arrays = load_split(run_root, split)
        digest.update(split.encode())
        digest.update(arrays.meta.astype(str).to_csv(index=False).encode())
        digest.update(arrays.labels.astype("<i8").tobytes())
        digest.update(np.ascontiguousarray(arrays.images, np.uint8).tobytes())
        digest.update(b"no masks" if arrays.masks is None else np.ascontiguousarray(arrays.masks, np.uint8).tobytes())
    return digest.hexdigest()


@pytest.mark.timeout(300)
def test_ingest_output_matches_the_hash_recorded_for_its_version(ray_local, tmp_path):
    root = write_golden_dataset(tmp_path / "golden")
    config = config_from_dict({"data": {"source": "ham10000", "root": str(root), "image_size": 32, "shard_rows": 8,
                                        "seed": 0}})
    digests = []
    for attempt in range(2):
        run = RunDir(tmp_path / f"run{attempt}")
        summary = ingest(config, run)
        assert summary["num_images"] == 47 and summary["rejected"] == 0 and summary["has_masks"]
        digests.append(shard_digest(run.root))
    assert digests[0] == digests[1], "ingest is not deterministic: two ingests of the same input differ"
    assert GOLDEN.get(INGEST_VERSION) == digests[0], (
        f"ingest's output for the golden data set changed (sha256 {digests[0]}), but INGEST_VERSION is still "
        f"{INGEST_VERSION} (recorded: {GOLDEN.get(INGEST_VERSION)}). If the change is intended, bump INGEST_VERSION "
        f"in pipelines/ingest.py to {INGEST_VERSION + 1} and add {{{INGEST_VERSION + 1}: \"{digests[0]}\"}} to GOLDEN "
        f"in tests/test_golden.py; otherwise ingest changed by accident.")
