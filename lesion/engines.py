"""Engines: what runs a member's forward pass behind the one inference core (``lesion.inference.Inference``).

An engine is a member loader, never a second inference path: the core calls ``loader(name, model_dir, device)`` and
gets an object with the ``Member`` interface (``name``, ``checkpoint``, ``version``, ``summary()``, ``probs(images, tta,
batch_size)``). Preprocessing, the evaluation transform, flip TTA, the ensemble and the answers stay the core's.

- ``torch`` (``loader_for("torch")`` is None: the core's own ``Member.load``): eager PyTorch, the reference, and the
  only engine Grad-CAM runs on (it needs gradients).
- ``onnxruntime`` (``OnnxRuntimeLoader``): the member's ONNX graph (opset 18, dynamic batch axis) in an ONNX Runtime
  CPU session sized for ``threads`` intra-op threads. A bundle member folder brings its ``model.onnx`` (and
  ``model.int8.onnx`` when the bundle was quantized); a run's member is exported once into ``cache_dir``
  (``RUN/export-cache/<checkpoint sha256>.onnx``) and reused while the checkpoint is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lesion.inference import TTA_FLIPS, Member, checkpoint_sha256
from lesion.labels import class_names
from lesion.models import load_trained, logits_to_probs, read_model_record
from lesion.records import CheckpointRecord
from lesion.vocabulary import ENGINES

log = logging.getLogger(__name__)

ONNX_OPSET = 18
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_BATCH = 4096  # upper bound of the exported dynamic batch axis


class ExportError(RuntimeError):
    """A model that cannot be exported, or whose export disagrees with eager PyTorch; the message names the model."""


def export_program(net: nn.Module, input_size: int, name: str) -> torch.export.ExportedProgram:
    """``torch.export`` of a network in eval mode taking (N, 3, S, S) normalised images, N dynamic."""
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise ExportError(f"{name}: torch.export failed: {type(exc).__name__}: {_first_lines(exc)}") from exc


def export_onnx(program: torch.export.ExportedProgram, path: str | Path, name: str) -> Path:
    """Write an exported program as ONNX (opset ``ONNX_OPSET``, input ``input``, output ``logits``, dynamic batch)."""
    path = Path(path)
    example = torch.zeros(2, *program.example_inputs[0][0].shape[1:])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, (example,), None, input_names=[INPUT_NAME],
                                             output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET, dynamo=True,
                                             verbose=False)
            onnx_program.save(str(path))
    except Exception as exc:
        raise ExportError(f"{name}: ONNX export failed (opset {ONNX_OPSET}): {type(exc).__name__}: "
                          f"{_first_lines(exc)}") from exc
    return path


def _first_lines(exc: BaseException, lines: int = 6) -> str:
    """The head of an exception's message (the exporters' messages name the operator first, then pages of trace)."""
    return "\n".join(str(exc).strip().splitlines()[:lines])


def onnx_session(path: str | Path, threads: int = 2):
    """An ONNX Runtime CPU session for one member: ``threads`` intra-op threads, one inter-op thread, sequential
    execution, every graph optimisation (the 2-core laptop and serving replicas this is sized for)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxMember(Member):
    """A member whose forward pass runs in ONNX Runtime (``net`` is None: no gradients, so no Grad-CAM)."""

    session: Any = None
    onnx_file: str = ""
    threads: int = 2

    def __getstate__(self) -> dict:
        """Pickled without its session, which cannot be (Ray Serve pickles a replica's attributes to scan them);
        unpickling reopens it from ``onnx_file``."""
        return {**self.__dict__, "session": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = onnx_session(self.onnx_file, self.threads)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of normalised float32 images (N, 3, S, S)."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def probs(self, images: np.ndarray, *, tta: bool, batch_size: int = 64) -> np.ndarray:
        """Raw class probabilities (N, C) of preprocessed uint8 images (N, S, S, 3); the flips of a chunk run as one
        batch."""
        record, out = self.checkpoint, []
        flips = TTA_FLIPS if tta else ((),)
        for start in range(0, len(images), batch_size):
            chunk = np.array(images[start:start + batch_size])  # a writable copy (shard and Ray views are read-only)
            x = record.input_transform(chunk).numpy()
            views = np.concatenate([np.flip(x, axis=f) if f else x for f in flips])
            probs = logits_to_probs(self.logits(views), record.task).reshape(len(flips), len(chunk), -1)
            out.append(probs.mean(axis=0, dtype=np.float32) if tta else probs[0])
        return np.concatenate(out) if out else np.zeros((0, len(class_names(record.task))), np.float32)


def member_record(model_dir: str | Path) -> CheckpointRecord:
    """A member's checkpoint record without building its network (``model.json``), with the sha256 of ``best.pt``."""
    return dataclasses.replace(read_model_record(model_dir), checkpoint_sha256=checkpoint_sha256(model_dir))


@dataclass(frozen=True)
class OnnxRuntimeLoader:
    """Loads members into ONNX Runtime: a bundle member's own ONNX file (its INT8 one with ``int8``), else the
    run member's export in ``cache_dir``, made on first use."""

    cache_dir: str | None = None
    threads: int = 2
    int8: bool = False
    engine: str = "onnxruntime"

    def __call__(self, name: str, model_dir: str | Path, device: str = "cpu") -> OnnxMember:
        if torch.device(device).type != "cpu":
            raise ValueError(f"{name}: the onnxruntime engine runs on the CPU; use --engine torch for {device}")
        model_dir = Path(model_dir)
        record = member_record(model_dir)
        path = model_dir / (INT8_FILE if self.int8 else ONNX_FILE)
        if self.int8 and not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no {INT8_FILE} (export the bundle with --quantize int8)")
        if not path.is_file():
            path = self._cached(name, model_dir, record.checkpoint_sha256)
        session = onnx_session(path, self.threads)
        log.info("%s: ONNX Runtime session on %s (%d threads)", name, path, self.threads)
        return OnnxMember(name, None, record, "cpu", session=session, onnx_file=str(path), threads=self.threads)

    def _cached(self, name: str, model_dir: Path, sha256: str) -> Path:
        """The run member's ONNX export in the cache, written (atomically) when missing."""
        if not self.cache_dir:
            raise FileNotFoundError(f"{model_dir}: no {ONNX_FILE} and no export cache to write one into")
        path = Path(self.cache_dir) / f"{sha256}.onnx"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s: exporting to ONNX into the run's cache %s", name, path)
        net, record = load_trained(model_dir)
        program = export_program(net, record.input_size, name)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            export_onnx(program, tmp, name)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def loader_for(engine: str, cache_dir: str | Path | None = None, *, threads: int = 2, int8: bool = False):
    """The member loader of ``engine`` (one of ``lesion.vocabulary.ENGINES``): None for torch (the core's default
    ``Member.load``), an ``OnnxRuntimeLoader`` for onnxruntime."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "torch":
        return None
    return OnnxRuntimeLoader(str(cache_dir) if cache_dir else None, threads, int8)
