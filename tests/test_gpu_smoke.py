"""The GPU benchmark proven on the CPU: a worker given a GPU that torch cannot see computes on the CPU as on one, and
``python -m benchmarks.gpu --smoke`` runs every step (ingest, train beside the ceiling, tune on GPU shares, serve on
GPU replicas) on a Ray with a logical GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesion.config import TrainConfig
from lesion.models import create_model
from lesion.training import LoopSettings, build_loss, build_optimizer, train_epoch
from pipelines import loop
from pipelines.loop import process_group_backend, worker_device

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")


@no_cuda
def test_a_gpu_torch_cannot_see_falls_back_to_the_cpu():
    # what ray.train.torch.get_device() answers a worker given a logical GPU
    assert worker_device(torch.device("cuda:0")) == (torch.device("cpu"), True)
    assert worker_device(torch.device("cpu")) == (torch.device("cpu"), False)


@no_cuda
@pytest.mark.parametrize("gpus_here, backend", [(1.0, "gloo"), (0.0, "nccl")])
def test_gpu_workers_use_nccl_unless_the_gpus_are_logical(monkeypatch, gpus_here, backend):
    # NCCL refuses to start without a real GPU: logical GPUs on this node mean gloo; a driver on a node without GPUs
    # (a CPU head node) keeps NCCL for the GPU workers elsewhere
    monkeypatch.setattr(loop.ray, "nodes", lambda: [{"NodeID": "here", "Resources": {"CPU": 2.0, "GPU": gpus_here}}])
    context = type("Context", (), {"get_node_id": lambda self: "here"})()
    monkeypatch.setattr(loop.ray, "get_runtime_context", lambda: context)
    assert process_group_backend(1.0) == backend
    assert process_group_backend(0.0) == "gloo"


def settings(**kwargs) -> LoopSettings:
    return LoopSettings(task="multiclass", num_classes=7, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32,
                        device=torch.device("cpu"), **kwargs)


def test_bf16_autocast_on_the_cpu_only_for_a_gpu_fallback():
    layer = torch.nn.Linear(4, 2)
    with settings(amp=True, amp_on_cpu=True).autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with settings(amp=True).autocast():  # a CPU run as configured keeps float32
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_a_training_step_under_cpu_bf16_and_channels_last_learns_in_float32():
    torch.manual_seed(0)
    cfg = TrainConfig()
    model = create_model("scratch_cnn", 7, pretrained=False, input_size=32).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    images = torch.randint(0, 256, (8, 48, 48, 3), dtype=torch.uint8)
    labels = torch.arange(8) % 7
    optimizer, loss_fn = build_optimizer(model, cfg), build_loss("multiclass", cfg, [2] * 7)
    out = train_epoch(model, [(images, labels)] * 2, optimizer, loss_fn, settings(amp=True, amp_on_cpu=True),
                      augment_strength=1.0, generator=torch.Generator().manual_seed(0))
    assert out["images"] == 16 and out["train_loss"] == out["train_loss"]  # not NaN
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)  # the weights stay float32 under autocast
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.realdata
@no_cuda
def test_smoke_runs_every_step_on_a_logical_gpu(tmp_path, ham10000, ham10000_fullres):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out), "--work",
                    str(tmp_path / "work"), "--data", str(ham10000), "--fullres", str(ham10000_fullres / "images")],
                   cwd=ROOT, env=os.environ.copy(), check=True, timeout=600)
    result = json.loads((out / "gpu-cpu-smoke.json").read_text())
    assert result["smoke"] and result["device"]["gpu"] is None and result["device"]["logical_gpus"] == 1
    assert result["ingest"]["rows"] >= 240 and result["ingest"]["train_rows"] > 0
    rows = result["rows"]
    train = [r for r in rows if r["step"] == "train"]
    every = ("resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite0")
    assert {(r["model"], r["setup"]) for r in train} == {(m, "plain loop (ceiling)") for m in every} | {
        (m, "lesion train --gpu") for m in ("resnet50", "efficientnet_lite0")}
    for r in train:
        assert r["rate"] > 0 and r["ratio"] > 0
        if r["setup"] == "lesion train --gpu":
            assert r["ray_gpu_used_max"] == 1.0  # the worker held the (logical) GPU while it trained on the CPU
        else:
            assert r["autocast"] == "bf16" and r["device"] == "cpu"
    (tuned,) = [r for r in rows if r["step"] == "tune"]
    assert tuned["trials_finished"] == 4 and "failed" not in tuned["status_counts"]
    assert tuned["trials_at_once"] == 4 and tuned["ratio"] == 1.0  # 4 trials x 0.25 GPU shared the one GPU
    served = [r for r in rows if r["step"] == "serve"]
    assert sorted(r["clients"] for r in served) == [1, 1, 8, 8, 32, 32]
    assert all(r["rate"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in served)
    # every request answered, but for the odd 503 of an overloaded server past serve.answer_timeout_s
    assert all(r["errors"] <= r["requests"] // 8 for r in served)
    ours = [r for r in served if r["setup"].startswith("lesion serve")]
    assert all(r["ray_gpu_placed"] == 0.5 for r in ours)  # the model and Grad-CAM replicas at 0.25 GPU each
