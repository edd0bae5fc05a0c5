"""Training throughput: ``lesion train``'s Ray Train path beside the plain PyTorch loop a user would write instead.

Every set-up trains the same model, from the same ingested shards (an ingested run directory), with the same
augmentation, input size, global batch and number of CPU threads, and reports training images/s (validation
excluded) of the epochs after the first (the first holds Ray Data's and oneDNN's warm-up):

- ``ray-ddp``: ``pipelines.train.train_model`` with ``train.workers`` DDP workers of ``train.cpus_per_worker``
  (Ray gives each worker torch threads for its CPU share, at least one);
- ``ray-1worker``: the same with one worker and ``train.threads_per_worker`` = all the threads;
- ``plain``: a single-process loop over the split held in memory (``torch.set_num_threads``, shuffled batches,
  ``augment_batch``, normalise, forward, backward, gradient clipping, AdamW), the peer ``ratio`` is taken against.

The set-ups run interleaved ``--repeats`` times; each row's ``ratio`` is its median images/s over the plain loop's
median (best and worst beside it), with the peak memory (PSS) of each: the plain loop's process (which also holds
the Ray driver's imports), and for Ray the whole local cluster (driver, GCS, raylet, workers, Ray Data). Ray's
start-up is timed apart and not inside any figure. Results go to
``benchmarks/results/train-LABEL.json`` (``--label``: the data size measured, e.g. 1x and 4x).

    python -m benchmarks.train --run RUN [--models scratch_cnn efficientnet_lite0] [--epochs 2]
        [--repeats 2] [--threads 2] [--label 1x] [--setups ray-ddp ray-1worker]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.shared import PeakMemory, cpu_model, save_result
from lesion.config import Config, config_from_dict
from lesion.data import augment
from lesion.data.shards import load_split, read_info
from lesion.models import create_model, model_spec
from lesion.rundir import RunDir, package_versions
from pipelines.common import init_ray, resolve_config

SETUPS = ("ray-ddp", "ray-1worker")


def plain_epochs(config: Config, run: RunDir, name: str, epochs: int, threads: int, batch: int) -> list[float]:
    """The peer: images/s of each epoch of a plain single-process loop over the train split in memory."""
    torch.set_num_threads(threads)
    cfg = config.model_config(name)
    info = read_info(run.root)
    split = load_split(run.root, "train")
    arch, size = cfg.arch or name, int(cfg.input_size or info.image_size)
    spec = model_spec(arch)
    model = create_model(arch, len(info.classes), pretrained=cfg.pretrained, input_size=size,
                         **{k: getattr(cfg, k) for k in spec["arch_kwargs"]}).to(memory_format=torch.channels_last)
    mean, std = spec["mean"], spec["std"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        started = time.perf_counter()
        for start in range(0, len(order) - 1, batch):
            idx = order[start:start + batch]
            x = augment.augment_batch(augment.to_float(images[idx]), cfg.augment, generator)
            x = augment.normalize(augment.resize(x, size), mean, std).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:  # as the Ray loop does (train.grad_clip)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        rates.append(len(order) / (time.perf_counter() - started))
    return rates


def ray_epochs(config: Config, run: RunDir, name: str, epochs: int, layout: dict) -> list[float]:
    """images/s of each epoch of ``pipelines.train.train_model`` with the train section changed by ``layout``, in a
    scratch copy of the run's data (so the run's own models stay as they are)."""
    from pipelines.train import train_model

    values = config.to_dict()
    values["train"].update(layout, epochs=epochs, patience=epochs + 1)
    values["train"]["models"] = {name: {k: v for k, v in config.train.models.get(name, {}).items()
                                        if k not in ("epochs", "batch_size")}}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        copy = RunDir(Path(scratch) / "run")
        copy.root.mkdir(parents=True)
        os.symlink(run.data, copy.data)
        train_model(config_from_dict(values), copy, name)
        history = json.loads((copy.model_dir(name) / "history.json").read_text())
    return [row["images_per_second"] for row in history]


def summary(rates: list[list[float]]) -> dict:
    """Median, best and worst images/s over repeats, each repeat the mean of its epochs after the first."""
    per_repeat = [statistics.mean(r[1:] or r) for r in rates]
    return {"images_per_s": round(statistics.median(per_repeat), 1), "best": round(max(per_repeat), 1),
            "worst": round(min(per_repeat), 1), "repeats": [round(v, 1) for v in per_repeat]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an ingested run directory (its config and train split)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--models", nargs="+", default=["scratch_cnn", "efficientnet_lite0"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per set-up and repeat (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every set-up")
    parser.add_argument("--label", default="1x", help="the data size this run measures (for the table)")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS),
                        help="Ray set-ups beside the plain loop (ray-1worker: one worker with every thread)")
    args = parser.parse_args(argv)
    run = RunDir(args.run)
    config = resolve_config(run, args.config)
    ddp = {"workers": config.train.workers, "cpus_per_worker": config.train.cpus_per_worker,
           "batch_size": config.train.batch_size}
    batch = ddp["workers"] * ddp["batch_size"]  # the same global batch everywhere
    layouts = {"ray-ddp": ddp,
               "ray-1worker": {"workers": 1, "cpus_per_worker": 1.0, "threads_per_worker": args.threads,
                               "batch_size": batch}}
    layouts = {label: layouts[label] for label in args.setups}
    started = time.perf_counter()
    init_ray()
    ray_start = time.perf_counter() - started
    load, samples = os.getloadavg(), []
    for name in args.models:
        for repeat in range(args.repeats):
            rates, peaks = {}, {}
            with PeakMemory(pids=lambda: [os.getpid()]) as memory:  # this process: the local Ray beside it is idle
                rates["plain"] = plain_epochs(config, run, name, args.epochs, args.threads, batch)
            peaks["plain"] = memory.peak_mb
            for label, layout in layouts.items():
                with PeakMemory() as memory:
                    rates[label] = ray_epochs(config, run, name, args.epochs, layout)
                peaks[label] = memory.peak_mb
            samples += [{"model": name, "setup": label, "repeat": repeat, "images_per_s": [round(x, 1) for x in r],
                         "peak_mb": peaks[label]} for label, r in rates.items()]
            print(name, repeat, {k: [round(x, 1) for x in v] for k, v in rates.items()}, peaks, flush=True)
            write_results(argv, run, config, args, batch, ray_start, load, samples)  # a killed run keeps its repeats
    return 0


def rows_of(samples: list[dict], label: str) -> list[dict]:
    """Per model and set-up: ``summary`` of its repeats and the ``ratio`` to the plain loop's median."""
    rows = []
    for name in dict.fromkeys(s["model"] for s in samples):
        mine = {setup: [s for s in samples if s["model"] == name and s["setup"] == setup]
                for setup in (*SETUPS, "plain")}
        peer = summary([s["images_per_s"] for s in mine["plain"]])["images_per_s"]
        for setup, runs in mine.items():
            if not runs:
                continue
            row = {"model": name, "setup": setup, "data": label, **summary([s["images_per_s"] for s in runs]),
                   "peak_mb": round(statistics.median(s.get("peak_mb", 0.0) for s in runs), 1)}
            rows.append({**row, "ratio": round(row["images_per_s"] / peer, 2)})
    return rows


def write_results(argv, run: RunDir, config: Config, args, batch: int, ray_start: float | None, load,
                  samples) -> None:
    """benchmarks/results/train-LABEL.json from the samples so far."""
    rows = rows_of(samples, args.label)
    info = read_info(run.root)
    result = {
        "benchmark": "train",
        "command": "python -m benchmarks.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "data": {"run": str(run.root), "train_images": info.split_rows("train"),
                 "image_size": info.image_size, "input_size": config.train.input_size},
        "threads": args.threads, "global_batch": batch, "epochs": args.epochs, "repeats": args.repeats,
        "ray_start_s": None if ray_start is None else round(ray_start, 2),
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": [round(x, 2) for x in load],
                   "platform": platform.platform()},
        "versions": package_versions(),
        "rows": rows,
        "samples": samples,
    }
    save_result(f"train-{args.label}", result)


if __name__ == "__main__":
    raise SystemExit(main())
