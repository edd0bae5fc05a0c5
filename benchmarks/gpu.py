"""The GPU run: training, tuning and serving of ``lesion`` on one GPU machine in about 8 minutes, each beside its peer.

One local Ray for every step, started here with the machine's GPUs (the commands' own ``init_ray`` joins it):

1. **ingest**: real HAM10000 images (a folder in the official layout, ``--data``) repeated to ``--rows`` rows (a copy
   keeps its lesion_id, so the grouped split keeps copies together), through ``lesion ingest`` at ``--image-size`` px;
2. **train**, per architecture: ``lesion train --gpu`` (one Ray Train worker on one GPU, fed by Ray Data), its
   steady-state images/s = training images over training seconds of the epochs after the first; beside it the
   ceiling, the same training step (``lesion.training.train_epoch``: GPU augmentation, bf16 autocast, channels_last,
   same model, batch, loss and optimizer) on the train split held in GPU memory, without data loading. ``ratio`` is
   Ray's over the ceiling; the GPU's utilisation (mean over the steady epochs' training) and peak memory (the
   device's memory in use above what it held before the step) come from NVML samples every 0.2 s;
3. **tune**: ``lesion tune`` with 8 trials at 0.25 GPU each: wall time, trials per minute, and how many trials held a
   GPU share at once (the GPU Ray had handed out, sampled, over the share); ``ratio`` = that over 1 / 0.25;
4. **serve**: ``lesion serve --gpus-per-replica 0.25`` (``pipelines.serve.deploy``) of one trained model, and the
   one-process peer of ``benchmarks/serve.py`` on the same run and device: /v1/predict p50/p99 and requests/s with
   1, 8 and 32 clients sending the real 600x450 JPEGs (``--fullres``); ``ratio`` = requests/s over the peer's.

Writes ``OUT/gpu-<device>.json`` (``--out``, default ``benchmarks/results``): device, versions, command, plan, every
figure, and ``rows`` (train, tune and serve, each with its ``ratio``); it is rewritten after every step, so a run
stopped at the call's time limit keeps what it measured.

``--smoke`` runs every step at toy sizes on the CPU through the same code (Ray Train for two of the four
architectures, 4 trials; see ``SMOKE``): Ray starts with a logical GPU
(``ray.init(num_gpus=1)``), so fractional trial and replica placement, the capacity checks and the packing of 4
trials on one GPU happen for real, while the workers, given a GPU that torch cannot see, compute on the CPU as on one
(bf16 autocast, channels_last; ``pipelines.loop.worker_device``).

On a GPU machine (docs/guides/gpu.md): ``bash benchmarks/gpu_pack.sh`` here packs what the machine lacks into
``.device/``; then one device call, with carry [".device"] and timeout_s 600, runs

    bash .device/run.sh .device -- bash -c 'PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --data .device/data/ham10000
        --fullres .device/data/fullres --out $OUT 2>&1 | tee $OUT/gpu.log'

and the JSON comes back under the call's files; copy it to ``benchmarks/results/``.

    python -m benchmarks.gpu [--smoke] [--out DIR] [--models resnet50 ...] [--data DIR] [--fullres DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.shared import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODELS = ("resnet50", "densenet121", "efficientnet_b0", "efficientnet_lite0")
# a plain timm loop on an H100 (bf16, channels_last, batch 256, GPU-resident random data): ../shared/tools/device
ANCHORS_H100 = {"resnet50": 3984, "densenet121": 2518, "efficientnet_b0": 4559, "efficientnet_lite0": 5448}
TARGETS = {"train_ratio": 0.95, "trials_at_once": 4, "serve_p99_ms_1_client": 50.0, "serve_ratio": 1.0}

log = logging.getLogger("benchmarks.gpu")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run."""

    rows: int  # ingested rows (the images repeated)
    per_class: int | None  # images of each class taken from --data (None: all)
    image_size: int
    input_size: int | None  # the models' input side (None: image_size)
    batch_size: int
    epochs: int  # of each `lesion train` (the first is warm-up)
    cpus_per_worker: float
    ceiling_steps: tuple[int, int]  # warm-up, timed
    trials: int
    tune_epochs: int
    gpus_per_trial: float
    cpus_per_trial: float
    gpus_per_replica: float
    clients: tuple[int, ...]
    requests_per_level: int  # spread over the clients, at least 2 each
    serve_model: str
    ray_models: tuple[str, ...] | None = None  # the models also trained through `lesion train` (None: every one)


FULL = Plan(rows=20_000, per_class=None, image_size=256, input_size=None, batch_size=256, epochs=3,
            cpus_per_worker=8, ceiling_steps=(15, 60), trials=8, tune_epochs=2, gpus_per_trial=0.25,
            cpus_per_trial=2, gpus_per_replica=0.25, clients=(1, 8, 32), requests_per_level=256,
            serve_model="efficientnet_lite0")
# The smoke's time goes to start-ups, not to work: on 2 cores each `lesion train` costs about 40 s of Ray Train
# start-up and each wave of trials about 25 s. So the plain loop (bf16, channels_last, the same training step) runs
# every architecture, Ray Train two of them (a batch-norm ResNet and the served depthwise EfficientNet), and 4
# trials at 0.25 GPU fill the one logical GPU once.
SMOKE = dataclasses.replace(FULL, rows=240, per_class=12, image_size=64, input_size=32, batch_size=16, epochs=2,
                            cpus_per_worker=0.5, ceiling_steps=(1, 3), trials=4, tune_epochs=1, cpus_per_trial=0.25,
                            requests_per_level=16, ray_models=("resnet50", "efficientnet_lite0"))


# --------------------------------------------------------------------------------------------- measuring


class GpuMonitor:
    """Samples every ``interval`` s in a thread: the GPU's utilisation (%) and memory in use (MiB) through NVML where
    there is a GPU, and the GPU share Ray has handed out (its total minus what is available)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples = interval, []  # (time, utilisation or None, memory MiB or None, Ray GPU used)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._nvml = self._handle = None
        with contextlib.suppress(Exception):  # no NVML (no GPU, or nvidia-ml-py absent): utilisation stays None
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)

    def read(self) -> tuple[float, float | None, float | None, float]:
        import ray

        util = memory = None
        if self._handle is not None:
            util = float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        used = ray.cluster_resources().get("GPU", 0.0) - ray.available_resources().get("GPU", 0.0)
        return time.time(), util, memory, used

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a sample lost while Ray restarts a component is no failure
                self.samples.append(self.read())

    def __enter__(self) -> GpuMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[tuple]:
        return [s for s in list(self.samples) if start <= s[0] <= end]

    def stats(self, start: float, end: float, busy: list[tuple[float, float]] | None = None) -> dict:
        """GPU utilisation (mean % over the ``busy`` intervals, default the whole window), peak memory in use above
        the first sample's (MiB), and the most GPU Ray had handed out, from ``start`` to ``end``."""
        window = self.between(start, end)
        busy = busy or [(start, end)]
        utils = [s[1] for s in window if s[1] is not None and any(a <= s[0] <= b for a, b in busy)]
        memory = [s[2] for s in window if s[2] is not None]
        return {"gpu_util_mean": round(sum(utils) / len(utils), 1) if utils else None,
                "peak_gpu_memory_mib": round(max(memory) - memory[0], 0) if memory else None,
                "ray_gpu_used_max": round(max((s[3] for s in window), default=0.0), 3)}


def lesion(*argv) -> None:
    """Run one ``lesion`` command in this process (on the Ray started here); fail on a non-zero exit."""
    from pipelines.cli import main

    argv = [str(a) for a in argv]
    log.info("$ lesion %s", shlex.join(argv))
    code = main(argv)
    if code:
        raise RuntimeError(f"`lesion {shlex.join(argv)}` exited with {code}")


def row(step: str, model: str, setup: str, rate: float, unit: str, **figures) -> dict:
    """One row of the result: the same leading keys for every step (a table of the rows takes its columns from the
    first), then the step's own figures. ``ratio`` is ours over the peer's (1.0 on the peer's own rows)."""
    lead = {"step": step, "model": model, "setup": setup, "clients": figures.pop("clients", None), "rate": rate,
            "unit": unit, "ratio": figures.pop("ratio", None)}
    lead.update((key, figures.pop(key, None)) for key in ("gpu_util_mean", "peak_gpu_memory_mib", "ray_gpu_used_max"))
    return {**lead, **figures}


# --------------------------------------------------------------------------------------------- the steps


def repeated_ham10000(source: Path, folder: Path, plan: Plan) -> int:
    """A HAM10000 folder (metadata.csv + images/) holding ``source``'s images (``plan.per_class`` of each class, or
    all) as links, repeated until there are at least ``plan.rows`` rows; copy k of image X is ``X-rk``, with X's
    lesion_id. Returns the rows."""
    frame = pd.read_csv(source / "metadata.csv")
    if plan.per_class:
        frame = frame.groupby("dx", group_keys=False).head(plan.per_class)
    files = {p.stem: p.resolve() for p in source.rglob("*.jpg")}
    frame = frame[frame["image_id"].isin(files)]
    if frame.empty:
        raise FileNotFoundError(f"no images of {source / 'metadata.csv'} under {source}")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    copies = []
    for k in range(math.ceil(plan.rows / len(frame))):
        copy = frame.assign(image_id=frame["image_id"] + f"-r{k}")
        for original, name in zip(frame["image_id"], copy["image_id"]):
            (folder / "images" / f"{name}.jpg").symlink_to(files[original])
        copies.append(copy)
    table = pd.concat(copies)
    table.to_csv(folder / "metadata.csv", index=False)
    return len(table)


def write_config(path: Path, plan: Plan, models: list[str]) -> None:
    """The run's config: every model trained from scratch (throughput only) with bf16 and channels_last, streamed
    from the shards every epoch (``cache_mb: 0``), no early stopping; tuning and serving at the plan's GPU shares."""
    train = {"workers": 1, "cpus_per_worker": plan.cpus_per_worker, "batch_size": plan.batch_size,
             "epochs": plan.epochs, "patience": 0, "pretrained": False, "amp": True, "channels_last": True,
             "cache_mb": 0, "models": {name: {} for name in models}}
    if plan.input_size:
        train["input_size"] = plan.input_size
    serve = {"models": [plan.serve_model], "min_replicas": 1, "max_replicas": 1, "host": "127.0.0.1",
             "max_pending_requests": 4 * max(plan.clients)}
    path.write_text(yaml.safe_dump({"train": train, "serve": serve}, sort_keys=False))


def ingest(plan: Plan, source: Path, work: Path, config: Path) -> dict:
    """``lesion ingest`` of the repeated folder: rows, seconds and images/s."""
    from lesion.data.shards import read_info

    rows = repeated_ham10000(source, work / "ham10000", plan)
    started = time.perf_counter()
    lesion("ingest", "--run", work / "run", "--config", config, "--source", "ham10000", "--root", work / "ham10000",
           "--image-size", plan.image_size)
    info = read_info(work / "run")
    return {"source": str(source), "rows": rows, "image_size": plan.image_size, "train_rows": info.split_rows("train"),
            "seconds": round(time.perf_counter() - started, 1),
            "images_per_second": info.images_per_second and round(info.images_per_second, 1)}


def ray_train(run: Path, config: Path, name: str, monitor: GpuMonitor) -> dict:
    """``lesion train --gpu`` of ``name``: steady-state images/s (epochs after the first) and GPU figures."""
    from lesion.rundir import RunDir

    started = time.time()
    lesion("train", "--run", run, "--config", config, "--model", name, "--gpu")
    ended = time.time()
    history = json.loads((RunDir(run).model_dir(name) / "history.json").read_text())
    steady = history[1:] or history
    busy = [(r["time"] - r["epoch_seconds"], r["time"] - r["epoch_seconds"] + r["train_seconds"]) for r in steady]
    rate = sum(r["images"] for r in steady) / sum(r["train_seconds"] for r in steady)
    return row("train", name, "lesion train --gpu", round(rate, 1), "images/s", wall_s=round(ended - started, 1),
               epochs_images_per_s=[round(r["images_per_second"], 1) for r in history],
               **monitor.stats(started, ended, busy))


def ceiling(run: Path, config_path: Path, name: str, plan: Plan, monitor: GpuMonitor) -> dict:
    """The same training step as the Ray worker's (``train_epoch``) on the train split held on the device: random
    batches drawn there, no data loading; images/s over the timed steps after the warm-up ones."""
    from lesion.data.shards import load_split, read_info
    from lesion.models import model_spec
    from lesion.rundir import RunDir
    from lesion.training import LoopSettings, build_loss, build_optimizer, train_epoch
    from pipelines.common import resolve_config
    from pipelines.loop import build_model, loop_spec, worker_device

    cfg = resolve_config(RunDir(run), str(config_path)).model_config(name)
    loop = loop_spec(cfg, name, read_info(run), progress=False)
    device, fallback = worker_device(torch.device("cuda"))
    split = load_split(run, "train")
    images, labels = torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)
    model = build_model(loop).to(device)
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    spec = model_spec(loop.arch)
    settings = LoopSettings(task=loop.task, num_classes=len(loop.classes), mean=spec["mean"], std=spec["std"],
                            input_size=loop.input_size, device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                            amp_on_cpu=fallback)
    optimizer, loss_fn = build_optimizer(model, cfg), build_loss(loop.task, cfg, loop.train_counts)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def steps(count: int) -> dict:
        batches = ((images[i], labels[i]) for i in (torch.randint(len(labels), (cfg.batch_size,), device=device,
                                                                  generator=generator) for _ in range(count)))
        return train_epoch(model, batches, optimizer, loss_fn, settings, augment_strength=cfg.augment,
                           augment_policy=cfg.augment_policy, mixup=cfg.mixup, generator=generator,
                           grad_clip=cfg.grad_clip)

    started = time.time()
    steps(plan.ceiling_steps[0])
    timed = time.time()
    out = steps(plan.ceiling_steps[1])  # ends with the epoch statistics copied to the host: the device is done
    ended = time.time()
    figures = row("train", name, "plain loop (ceiling)", round(out["images"] / (ended - timed), 1), "images/s",
                  ratio=1.0, device=str(device), train_loss=round(out["train_loss"], 4),
                  autocast="bf16" if cfg.amp and (device.type == "cuda" or fallback) else None,
                  **monitor.stats(started, ended, [(timed, ended)]))
    if device.type == "cuda":
        figures["torch_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    del model, optimizer, images, labels
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def tune(run: Path, config: Path, plan: Plan, monitor: GpuMonitor) -> dict:
    """``lesion tune`` with the plan's trials at ``gpus_per_trial`` each: wall time, trials/min, trials at once."""
    from lesion.rundir import RunDir

    started = time.time()
    lesion("tune", "--run", run, "--config", config, "--trials", plan.trials, "--epochs", plan.tune_epochs,
           "--gpus-per-trial", plan.gpus_per_trial, "--cpus-per-trial", plan.cpus_per_trial)
    ended = time.time()
    summary = json.loads((RunDir(run).tune / "summary.json").read_text())
    stats = monitor.stats(started, ended)
    at_once = round(stats["ray_gpu_used_max"] / plan.gpus_per_trial)
    packing = int(1 / plan.gpus_per_trial + 1e-9)
    setup = f"lesion tune: {plan.trials} trials x {plan.gpus_per_trial:g} GPU"
    return row("tune", summary["model"], setup, round(plan.trials / ((ended - started) / 60), 2), "trials/min",
               ratio=round(at_once / packing, 2), trials_at_once=at_once, wall_s=round(ended - started, 1),
               epochs=plan.tune_epochs, cpus_per_trial=plan.cpus_per_trial, trials_finished=summary["trials_finished"],
               status_counts=summary["status_counts"], **stats)


def serve(run: Path, config_path: Path, plan: Plan, jpegs: Path, monitor: GpuMonitor) -> list[dict]:
    """``lesion serve --gpus-per-replica`` beside the one-process peer of ``benchmarks/serve.py``: /v1/predict at each
    concurrency (one warm-up request per client first), ``ratio`` = requests/s over the peer's."""
    from ray import serve as ray_serve

    from benchmarks.serve import baseline_server, free_port, load, wait_ready
    from lesion.rundir import RunDir
    from pipelines.common import resolve_config
    from pipelines.serve import APP_NAME, deploy

    images = [p.read_bytes() for p in sorted(jpegs.rglob("*.jpg"))]
    if not images:
        raise FileNotFoundError(f"no JPEGs under {jpegs}")
    config = resolve_config(RunDir(run), str(config_path), {"serve.gpus_per_replica": plan.gpus_per_replica,
                                                            "serve.port": free_port()})
    rows = []
    started = time.time()
    url = deploy(config, RunDir(run))
    wait_ready(url)
    startup = round(time.time() - started, 1)
    placed = monitor.read()[3]
    try:
        with baseline_server(run, config_path, None) as (peer_url, _):
            for clients in plan.clients:
                per_client = max(2, plan.requests_per_level // clients)
                for setup, address in ((f"lesion serve, {plan.gpus_per_replica:g} GPU per replica", url),
                                       ("one-process baseline", peer_url)):
                    load(address, "predict", images, clients, 1)
                    begun = time.time()
                    figures = load(address, "predict", images, clients, per_client)
                    rows.append(row("serve", plan.serve_model, setup, figures.pop("throughput_rps"), "requests/s",
                                    **figures, **monitor.stats(begun, time.time())))
    finally:
        ray_serve.delete(APP_NAME)
        ray_serve.shutdown()
    for served in rows:
        peer = next(r for r in rows if r["setup"] == "one-process baseline" and r["clients"] == served["clients"])
        served["ratio"] = round(served["rate"] / peer["rate"], 2)
        if served is not peer:
            served.update(startup_s=startup, ray_gpu_placed=round(placed, 3))
    return rows


# --------------------------------------------------------------------------------------------- the run


def device_info() -> dict:
    """The machine: its GPU (or that it has none and Ray was given a logical one), CPU and platform."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {**info, "gpu": props.name, "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda,
                "gpu_memory_gib": round(props.total_memory / 2**30, 1), "logical_gpus": None}
    return {**info, "gpu": None, "gpus": 0, "cuda": None, "logical_gpus": 1}


def device_label(device: dict, smoke: bool) -> str:
    """``h100``, ``h200``, ... from the GPU's name (``cpu`` without one), ``-smoke`` added for a smoke run."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", device["gpu"] or "")
    label = found.group(1).lower() if found else re.sub(r"[^a-z0-9]+", "-", (device["gpu"] or "cpu").lower())
    return label + ("-smoke" if smoke else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every step at toy sizes (on the CPU: a logical GPU)")
    parser.add_argument("--data", type=Path, default=DATA / "ham10000", help="HAM10000 folder (metadata.csv, images)")
    parser.add_argument("--fullres", type=Path, default=DATA / "ham10000-fullres" / "images",
                        help="600x450 JPEGs sent to the servers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the result JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the steps in order, rewriting the result after each."""
    args = parse_args(argv)
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from lesion.rundir import package_versions
    from pipelines.common import init_ray

    plan = SMOKE if args.smoke else FULL
    if plan.serve_model not in args.models:
        plan = dataclasses.replace(plan, serve_model=args.models[-1])
    work = args.work or Path(tempfile.mkdtemp(prefix="lesion-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    config, run = work / "gpu.yaml", work / "run"
    write_config(config, plan, args.models)
    device = device_info()
    out = args.out / f"gpu-{device_label(device, args.smoke)}.json"
    result = {"benchmark": "gpu", "smoke": args.smoke, "device": device, "versions": package_versions(),
              "command": "python -m benchmarks.gpu " + shlex.join(sys.argv[1:] if argv is None else argv),
              "plan": dataclasses.asdict(plan), "models": args.models, "targets": TARGETS,
              "anchors_h100_images_per_s": ANCHORS_H100, "seconds": {}, "rows": []}
    started = time.perf_counter()
    init_ray(num_gpus=None if torch.cuda.is_available() else device["logical_gpus"])
    result["seconds"]["ray_start"] = round(time.perf_counter() - started, 1)
    try:
        with GpuMonitor() as monitor:
            run_steps(result, plan, args, work, config, run, monitor, out)
    finally:
        result["seconds"]["total"] = round(time.perf_counter() - started, 1)
        save(result, out)
        ray.shutdown()
    print(f"wrote {out} ({result['seconds']['total']} s)")
    return 0


def run_steps(result: dict, plan: Plan, args, work: Path, config: Path, run: Path, monitor: GpuMonitor,
              out: Path) -> None:
    """Ingest, then train beside the ceiling per model, tune and serve; the result saved after each."""
    timed = result["seconds"]
    begun = time.perf_counter()
    result["ingest"] = ingest(plan, args.data, work, config)
    timed["ingest"] = round(time.perf_counter() - begun, 1)
    save(result, out)
    through_ray = [m for m in args.models if plan.ray_models is None or m in plan.ray_models or m == plan.serve_model]
    for name in args.models:
        begun = time.perf_counter()
        peak = ceiling(run, config, name, plan, monitor)
        if name in through_ray:
            measured = ray_train(run, config, name, monitor)
            measured["ratio"] = round(measured["rate"] / peak["rate"], 3)
            result["rows"].append(measured)
        result["rows"].append(peak)
        timed[f"train {name}"] = round(time.perf_counter() - begun, 1)
        save(result, out)
    begun = time.perf_counter()
    result["rows"].append(tune(run, config, plan, monitor))
    timed["tune"] = round(time.perf_counter() - begun, 1)
    save(result, out)
    begun = time.perf_counter()
    result["rows"] += serve(run, config, plan, args.fullres, monitor)
    timed["serve"] = round(time.perf_counter() - begun, 1)


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
