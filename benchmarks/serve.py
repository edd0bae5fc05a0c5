"""Serving latency and throughput: the Ray Serve application beside a plain single-process FastAPI + PyTorch server.

Both servers run the same HTTP app (``pipelines.api.build_api``: same body checks, same decoding and ingest
preprocessing) on the same run's inference core (``lesion.inference``). The Ray Serve one spreads it over
deployments (the ingress, which also combines the ensemble, one replica per model with dynamic batching,
Grad-CAM); the baseline is one uvicorn process (a subprocess) running ``pipelines.api.LocalBackend`` in threads,
without batching. A bounded load generator on loopback sends the real 600x450 HAM10000 JPEGs with 1, 8 and 32
concurrent clients, a fixed number of requests each, to /v1/predict and to /v1/explain (ensemble Grad-CAM), and
measures latency percentiles and throughput.

    python -m benchmarks.serve --run RUN_DIR [--requests 8] [--clients 1 8 32]

Writes ``benchmarks/results/serve_<device>.json`` (the docs' results page renders it). The client
threads share the machine with the servers, as on any single-box deployment.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]

from lesion.config import dump_yaml  # noqa: E402
from lesion.resolve import load_inference  # noqa: E402
from lesion.rundir import RunDir, package_versions  # noqa: E402
from benchmarks.shared import PeakMemory, cpu_model, process_tree  # noqa: E402
from pipelines.api import ApiSettings, LocalBackend, build_api  # noqa: E402
from pipelines.common import resolve_config, use_local_ray_env  # noqa: E402

IMAGES = ROOT.parent / "shared" / "data" / "ham10000-fullres" / "images"
ENDPOINTS = {"predict": ("/v1/predict", {}), "explain": ("/v1/explain", {"model": "ensemble", "method": "gradcam"})}


def serve_baseline(run: str, config_path: str, port: int, threads: int | None) -> None:
    """Run the baseline server (blocking): uvicorn, one process, the same FastAPI app on a local backend, with
    ``threads`` torch threads (default torch's: one per core)."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)

    config = resolve_config(RunDir(run), config_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU the Serve replicas get, where there is one
    core = load_inference(run, config, models=config.serve.models, tta=config.serve.tta, device=device)
    app = build_api(LocalBackend(core), ApiSettings.of(core, config.serve))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready in {seconds} s")


def load(url: str, endpoint: str, images: list[bytes], clients: int, per_client: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests one after another; latency percentiles (ms) and
    throughput (requests/s) over the whole burst."""
    path, fields = ENDPOINTS[endpoint]

    def client(index: int) -> list[tuple[float, int]]:
        session = requests.Session()
        out = []
        for k in range(per_client):
            data = images[(index * per_client + k) % len(images)]
            start = time.perf_counter()
            response = session.post(url + path, files={"file": ("x.jpg", data, "image/jpeg")}, data=fields,
                                     timeout=600)
            out.append(((time.perf_counter() - start) * 1000, response.status_code))
        return out

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        samples = [s for batch in pool.map(client, range(clients)) for s in batch]
    seconds = time.perf_counter() - started
    latencies = np.array([ms for ms, status in samples if status == 200])
    errors = sum(status != 200 for _, status in samples)
    if not len(latencies):
        raise RuntimeError(f"every {endpoint} request failed (statuses {sorted({s for _, s in samples})})")
    return {
        "endpoint": endpoint,
        "clients": clients,
        "requests": len(samples),
        "errors": int(errors),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 2),
        "mean_ms": round(float(latencies.mean()), 1),
        **{f"p{q}_ms": round(float(np.percentile(latencies, q)), 1) for q in (50, 95, 99)},
    }


def measure(server: str, url: str, images: list[bytes], levels: list[int], per_client: int) -> list[dict]:
    rows = []
    for endpoint in ENDPOINTS:
        for clients in levels:
            row = {"server": server, **load(url, endpoint, images, clients, per_client)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


@contextlib.contextmanager
def baseline_server(run: Path, config_path: Path, threads: int | None):
    """The baseline uvicorn server in a subprocess; yields its URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.serve", "--baseline-server", "--run", str(run), "--config", str(config_path),
               "--port", str(port)] + (["--baseline-threads", str(threads)] if threads else [])
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def ray_serve_app(run: Path, config_path: Path):
    """The Ray Serve application on a fresh local Ray; yields (URL, start-up seconds)."""
    import ray
    from ray import serve

    from pipelines.serve import deploy

    config = resolve_config(RunDir(run), str(config_path))
    config.serve.port = free_port()
    use_local_ray_env()  # the Serve mode `lesion serve` runs on a local Ray
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        started = time.perf_counter()
        url = deploy(config, RunDir(run))
        wait_ready(url)
        yield url, time.perf_counter() - started
    finally:
        serve.shutdown()
        ray.shutdown()


def ray_serve_processes(baseline_pid: int) -> list[int]:
    """This process's descendants without the baseline server's processes: the local Ray cluster."""
    others = {os.getpid(), *process_tree(baseline_pid)}
    return [pid for pid in process_tree(os.getpid()) if pid not in others]


def serve_processes() -> dict[str, int]:
    """The local Ray Serve application's processes: each replica (``ServeReplica:APP:DEPLOYMENT``) and the proxy, by
    name -> pid."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {f"{a.class_name}#{k}" if a.class_name != "ProxyActor" else "proxy": a.pid for k, a in enumerate(actors)
            if a.class_name.startswith("ServeReplica") or a.class_name == "ProxyActor"}


def collapsed_profile(path: Path, seconds: float, rate: int, top: int = 8) -> dict:
    """A py-spy ``--format raw`` file as: the CPU it shows busy (sampled non-idle stacks over samples taken; above 1
    when several threads run at once) and the functions with the most self time (share of the busy samples)."""
    self_time: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frame = stack.split(";")[-1]
        self_time[frame] = self_time.get(frame, 0) + int(count)
        total += int(count)
    ranked = sorted(self_time.items(), key=lambda item: -item[1])[:top]
    return {"busy_cpu": round(total / (seconds * rate), 3),
            "top_self": [{"function": frame, "share": round(count / max(total, 1), 3)} for frame, count in ranked]}


def profile_serve(url: str, images: list[bytes], clients: int, per_client: int, folder: Path,
                  rate: int = 50) -> dict:
    """py-spy (``record --format raw``, non-idle stacks) on the proxy and every replica while ``clients`` clients
    send /v1/predict: where each process spends its CPU, next to the burst's throughput."""
    folder.mkdir(parents=True, exist_ok=True)
    pids = serve_processes()
    spy_bin = str(Path(sys.executable).parent / "py-spy")
    spies = {name: subprocess.Popen([spy_bin, "record", "--nonblocking", "--format", "raw", "--rate", str(rate),
                                     "--pid", str(pid), "--output", str(folder / f"{name}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in pids.items()}
    time.sleep(2)  # py-spy attached
    started = time.perf_counter()
    burst = load(url, "predict", images, clients, per_client)
    seconds = time.perf_counter() - started
    for spy in spies.values():
        spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
    for spy in spies.values():
        spy.wait(timeout=60)
    return {"clients": clients, "burst": burst,
            "processes": {name: collapsed_profile(folder / f"{name}.txt", seconds + 2, rate)
                          for name in pids if (folder / f"{name}.txt").is_file()}}


def summarise(samples: list[dict]) -> list[dict]:
    """One row per server, endpoint and concurrency: medians over the repeats, best and worst throughput, and for
    Ray Serve the ``ratio`` of its median throughput to the baseline's and its p50 overhead (ms)."""
    keys = sorted({(s["server"], s["endpoint"], s["clients"]) for s in samples})
    rows = []
    for server, endpoint, clients in keys:
        mine = [s for s in samples if (s["server"], s["endpoint"], s["clients"]) == (server, endpoint, clients)]
        rows.append({"server": server, "endpoint": endpoint, "clients": clients,
                     "requests": sum(s["requests"] for s in mine), "errors": sum(s["errors"] for s in mine),
                     **{k: round(statistics.median(s[k] for s in mine), 1) for k in
                        ("throughput_rps", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "peak_mb")},
                     "best_rps": max(s["throughput_rps"] for s in mine),
                     "worst_rps": min(s["throughput_rps"] for s in mine)})
    peers = {(r["endpoint"], r["clients"]): r for r in rows if r["server"] == "fastapi-baseline"}
    for row in rows:
        peer = peers[(row["endpoint"], row["clients"])]
        row["ratio"] = round(row["throughput_rps"] / peer["throughput_rps"], 2)
        row["p50_overhead_ms"] = round(row["p50_ms"] - peer["p50_ms"], 1)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run directory with trained models")
    parser.add_argument("--config", help="config YAML (default: RUN/config.yaml)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=8, help="requests per client at every level")
    parser.add_argument("--cpus-per-replica", type=float, default=0.25, help="Ray Serve: CPU share per replica")
    parser.add_argument("--threads-per-replica", type=int, help="Ray Serve: torch threads per model/CAM replica")
    parser.add_argument("--baseline-threads", type=int,
                        help="the baseline's torch threads (default torch's: one per core)")
    parser.add_argument("--batch-wait-s", type=float,
                        help="Ray Serve: serve.batch_wait_timeout_s (default: the run's config, else this code's)")
    parser.add_argument("--engine", help="inference.engine of both servers, torch or onnxruntime (default: the run's "
                        "config)")
    parser.add_argument("--out", default="serve_cpu", help="result name: benchmarks/results/OUT.json")
    parser.add_argument("--repeats", type=int, default=2, help="both servers measured in turn this many times")
    parser.add_argument("--profile", type=int, metavar="CLIENTS",
                        help="after the measurements, profile the Ray Serve processes with py-spy under this many "
                             "clients (the result's 'profile')")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run = Path(args.run).resolve()
    if args.baseline_server:
        serve_baseline(str(run), args.config, args.port, args.baseline_threads)
        return 0

    config = resolve_config(RunDir(run), args.config)
    # fixed replicas: autoscaling in the middle of a short burst on two cores would measure replica start-up
    config.serve.min_replicas = config.serve.max_replicas = 1
    config.serve.cpus_per_replica = args.cpus_per_replica
    config.serve.threads_per_replica = args.threads_per_replica
    if args.engine:
        config.inference.engine = args.engine
    if args.batch_wait_s is not None:
        config.serve.batch_wait_timeout_s = args.batch_wait_s
    config.serve.host = "127.0.0.1"
    config_path = ROOT / "test-artifacts" / "serve-benchmark-config.yaml"
    config_path.parent.mkdir(exist_ok=True)
    dump_yaml(config.to_dict(), config_path)
    if not IMAGES.is_dir():
        raise SystemExit(f"real images not found at {IMAGES}")
    images = [p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))]
    setup_models = RunDir(run).trained_models()
    image_size = json.loads((run / "data" / "info.json").read_text())["image_size"]
    before = [round(x, 2) for x in os.getloadavg()]
    samples = []
    with baseline_server(run, config_path, args.baseline_threads) as (baseline_url, baseline_pid), \
            ray_serve_app(run, config_path) as (serve_url, startup):
        servers = {"fastapi-baseline": baseline_url, "ray-serve": serve_url}
        # memory (PSS): the baseline's process; Ray's local cluster (GCS, raylet, proxy, controller, replicas)
        # without this process, which only sends the requests
        processes = {"fastapi-baseline": lambda: process_tree(baseline_pid),
                     "ray-serve": lambda: ray_serve_processes(baseline_pid)}
        for url in servers.values():  # warm-up, once at every concurrency: first requests load lazily initialised
            for endpoint in ENDPOINTS:  # code paths, and each size of a dynamic batch is a new shape to oneDNN
                for clients in args.clients:
                    load(url, endpoint, images, clients, 1)
        for _ in range(args.repeats):
            for server, url in servers.items():
                with PeakMemory(pids=processes[server]) as memory:
                    rows = measure(server, url, images, args.clients, args.requests)
                samples += [{**row, "peak_mb": memory.peak_mb} for row in rows]
        profile = (profile_serve(serve_url, images, args.profile, args.requests * 2,
                                 ROOT / "test-artifacts" / "serve-profile") if args.profile else None)
    result = {
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "platform": platform.platform()},
        "versions": package_versions(),
        "command": "python -m benchmarks.serve " + " ".join(sys.argv[1:]),
        "run": {"models": setup_models, "image_size": image_size},
        "serve_config": dataclasses.asdict(config.serve),
        "engine": config.inference.engine,
        "baseline_threads": args.baseline_threads or torch.get_num_threads(),
        "serve_environment": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
        "requests_per_client": args.requests,
        "repeats": args.repeats,
        "load_average": {"before": before, "after": [round(x, 2) for x in os.getloadavg()]},
        "ray_serve_startup_s": round(startup, 1),
        "results": summarise(samples),
        "profile": profile,
        "samples": samples,
    }
    out = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
