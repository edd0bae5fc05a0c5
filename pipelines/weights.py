"""``lesion weights fetch``: download, where there is internet, every ImageNet weights file a config's models start
from, into a folder one copies to an air-gapped cluster and names there as ``train.weights_dir``.

The folder has the Hugging Face cache layout (``models--timm--<repo>/snapshots/<commit>/model.safetensors``), filled
through ``huggingface_hub`` (which honours ``HF_ENDPOINT``, so a mirror works); it also serves as ``HF_HUB_CACHE``.
Models started from scratch, from their own ``weights`` path or from an installed package's weights
(efficientnet_lite0/1/2) need nothing from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lesion.config import Config, load_config

log = logging.getLogger(__name__)


def weights_to_fetch(config: Config) -> dict[str, list[str]]:
    """Architecture -> the variants of ``train.models`` that start from its hub weights (``pretrained: true``, no
    ``weights`` path, no packaged weights), in config order."""
    from lesion.models import PACKAGED_WEIGHTS

    wanted: dict[str, list[str]] = {}
    for name in config.train.models:
        cfg = config.model_config(name)
        if cfg.pretrained is True and not cfg.weights and cfg.arch not in PACKAGED_WEIGHTS:
            wanted.setdefault(cfg.arch, []).append(name)
    return wanted


def fetch_weights(config: Config, dest: str | Path) -> dict[str, Path]:
    """Download the hub weights of every architecture of ``weights_to_fetch`` into ``dest`` (kept when already
    there); returns architecture -> file. Raises WeightsError naming the first that cannot be downloaded."""
    from lesion.models import download_hub_weights, hub_repo

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for arch, variants in weights_to_fetch(config).items():
        log.info("%s (%s): fetching %s", arch, ", ".join(variants), hub_repo(arch))
        files[arch] = download_hub_weights(arch, cache_dir=dest)
    return files


def add_arguments(name: str, parser) -> None:
    """Flags of ``lesion weights``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="download every pretrained weight a config needs into a folder",
                           description="Download, where there is internet, every ImageNet weights file the config's "
                                       "models start from into DEST; copy DEST to an air-gapped cluster and set "
                                       "train.weights_dir: DEST there.")
    fetch.add_argument("--config", required=True, help="the workflow config whose models need weights")
    fetch.add_argument("--dest", required=True, help="folder to fill (Hugging Face cache layout)")


def run_command(name: str, args) -> int:
    """``lesion weights fetch``: one line per architecture, then what to set on the cluster."""
    config = load_config(args.config)
    files = fetch_weights(config, args.dest)
    if not files:
        print(f"{args.config}: no model needs hub weights (scratch, a weights path, or packaged weights)")
        return 0
    for arch, path in files.items():
        print(f"{arch:<20} {path.stat().st_size / 1e6:8.1f} MB  {path}")
    print(f"copy {args.dest} to the cluster and set train.weights_dir: <its path there> in the config")
    return 0
