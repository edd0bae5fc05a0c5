"""Soak: the served API at twice the rate it can answer, with good and bad requests, while a model replica is killed.

Bounded in time and sent to loopback only. First the server's capacity is measured: as many clients as it admits at
once (``serve.max_pending_requests``) send good uploads back to back, and the answers per second are its rate. Then
requests arrive on a fixed schedule at ``--factor`` (default 2) times that rate, whatever the answers, in a fixed mix
of real JPEG uploads (good) and bad ones: not an image, a truncated JPEG, an empty body, a wrong content type, a tiny
image and bad base64. Part-way through one model replica is killed with ``ray.kill``; Serve's controller starts a new
one. Each request is sent once (no retry) and its first answer is recorded. A request is *lost* when it ends with
neither 2xx, 4xx nor 503 (another 5xx, a dropped connection, or no answer within ``--timeout``); *slow* when its
answer took over 5 s. Targets: none lost, none slow; the accepted requests' p99 is set beside the unbounded queue's
(``benchmarks/results/soak.json``, the server before it shed load). The summed RSS of Serve's HTTP proxy and every
replica is read from /proc after warm-up and at the end.

    python -m benchmarks.soak [--run RUN_DIR] [--seconds 90] [--factor 2]

Without ``--run`` it builds a small synthetic run (two models) under runs/soak. Writes
``benchmarks/results/soak-shedding.json``.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from benchmarks.shared import RESULTS, cpu_model, memory_bytes, save_result
from lesion.rundir import RunDir, package_versions

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "ham10000-fullres" / "images"
UNBOUNDED = RESULTS / "soak.json"  # the soak of the server that queued without bound
SLOW_S = 5.0


def jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A lesion-like JPEG (a dark blob on skin tone) when no real images are at hand."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2
    img = np.full((h, w, 3), (200, 150, 130), np.uint8)
    img[blob] = (90, 50, 40)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def good_images() -> list[bytes]:
    files = sorted(IMAGES.glob("*.jpg"))[:8]
    return [f.read_bytes() for f in files] or [jpeg((600, 450), seed) for seed in range(4)]


def request_mix(images: list[bytes]) -> list[tuple[str, dict]]:
    """(label, requests.post kwargs) in the order the requests cycle through: 2 good uploads to 1 bad one."""
    good = images[0]
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 60)).save(tiny, format="PNG")
    return [
        ("good", {"files": {"file": ("a.jpg", good, "image/jpeg")}}),
        ("good-base64", {"json": {"image_base64": base64.b64encode(images[-1]).decode()}}),
        ("not-an-image", {"files": {"file": ("a.jpg", b"hello, not an image", "image/jpeg")}}),
        ("good", {"files": {"file": ("b.jpg", images[len(images) // 2], "image/jpeg")}}),
        ("good", {"data": good, "headers": {"Content-Type": "image/jpeg"}}),
        ("truncated", {"files": {"file": ("t.jpg", good[: len(good) // 3], "image/jpeg")}}),
        ("good", {"files": {"file": ("a.jpg", good, "image/jpeg")}}),
        ("good", {"files": {"file": ("c.jpg", images[1 % len(images)], "image/jpeg")}}),
        ("empty", {"data": b"", "headers": {"Content-Type": "image/jpeg"}}),
        ("good", {"files": {"file": ("a.jpg", good, "image/jpeg")}}),
        ("good", {"files": {"file": ("a.jpg", good, "image/jpeg")}}),
        ("wrong-type", {"data": b"{}", "headers": {"Content-Type": "text/plain"}}),
        ("tiny", {"files": {"file": ("tiny.png", tiny.getvalue(), "image/png")}}),
        ("bad-base64", {"json": {"image_base64": "%%%not base64%%%"}}),
    ]


def send(url: str, kwargs: dict, timeout: float) -> tuple[int, float, str | None]:
    """POST once: (status, or 0 for no answer within ``timeout``; seconds; the Retry-After header of a 503)."""
    start = time.perf_counter()
    try:
        reply = requests.post(url, timeout=timeout, **kwargs)
    except requests.RequestException:
        return 0, time.perf_counter() - start, None
    return reply.status_code, time.perf_counter() - start, reply.headers.get("Retry-After")


def serve_actors() -> list:
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True,
                       limit=1000, raise_on_missing_output=False)


def serve_pids() -> list[int]:
    """PIDs of Serve's HTTP proxy and every replica that is alive now."""
    return [a.pid for a in serve_actors() if a.pid and ("ServeReplica" in a.class_name or "ProxyActor" in a.class_name)]


def kill_one_model_replica() -> str:
    """Kill one replica of a model deployment; Serve's controller replaces it. Returns the actor's class name."""
    import ray

    actors = serve_actors()
    replicas = [a for a in actors if "ServeReplica" in a.class_name and "model_" in a.class_name]
    if not replicas:
        raise RuntimeError("no model replica to kill: " + ", ".join(a.class_name for a in actors))
    victim = replicas[0]
    ray.kill(ray.get_actor(victim.name, namespace=victim.ray_namespace), no_restart=False)
    return victim.class_name


def capacity(url: str, images: list[bytes], clients: int, seconds: float) -> float:
    """Good uploads answered per second with ``clients`` back-to-back clients (as many as the server admits)."""
    kwargs = request_mix(images)[0][1]
    answered = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, _, _ = send(f"{url}/v1/predict", kwargs, 60)
            if status == 200:
                answered.append(time.perf_counter())
            else:
                time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
    return len(answered) / seconds


def soak(url: str, images: list[bytes], rate: float, seconds: float, kill_at: float | None, timeout: float) -> dict:
    """Send the mix at ``rate`` requests/s for ``seconds`` on a fixed schedule; kill a model replica at ``kill_at``."""
    mix = request_mix(images)
    rows: list[tuple[str, int, float, str | None, float]] = []
    lock = threading.Lock()
    total = int(rate * seconds)
    t0 = time.perf_counter()

    def one(index: int) -> None:
        label, kwargs = mix[index % len(mix)]
        sent_at = time.perf_counter() - t0
        status, taken, retry_after = send(f"{url}/v1/predict", kwargs, timeout)
        with lock:
            rows.append((label, status, taken, retry_after, sent_at))

    killed, killed_at = None, None
    # enough threads that every request in flight (at most rate x timeout) has one: the schedule never waits
    with concurrent.futures.ThreadPoolExecutor(math.ceil(rate * timeout) + 8) as pool:
        for index in range(total):
            due = t0 + index / rate
            if kill_at is not None and killed is None and due - t0 >= kill_at:
                killed, killed_at = kill_one_model_replica(), time.perf_counter() - t0
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(one, index)
    return summarise(rows, total / (rows[-1][4] if rows else 1), killed, killed_at)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def summarise(rows: list[tuple[str, int, float, str | None, float]], offered_rate: float, killed: str | None,
              killed_at: float | None) -> dict:
    """Counts by status and by kind, lost, slow and misanswered requests, latency percentiles."""
    statuses: dict[str, int] = {}
    for _, status, *_ in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    lost = [r for r in rows if not (200 <= r[1] < 300 or 400 <= r[1] < 500 or r[1] == 503)]
    wrong = [r for r in rows if (r[0].startswith("good") and r[1] not in (200, 503))
             or (not r[0].startswith("good") and r[1] == 200)]
    accepted = [r[2] for r in rows if r[1] == 200]
    shed = [r for r in rows if r[1] == 503]
    return {
        "requests": len(rows),
        "offered_rps": round(offered_rate, 2),
        "by_status": statuses,
        "lost": len(lost),
        "lost_examples": [{"kind": r[0], "status": r[1], "at_s": round(r[4], 1)} for r in lost[:10]],
        "slow_over_5s": sum(1 for r in rows if r[2] > SLOW_S),
        "misanswered": len(wrong),
        "shed_503": len(shed),
        "shed_without_retry_after": sum(1 for r in shed if not r[3]),
        "good": sum(1 for r in rows if r[0].startswith("good")),
        "bad": sum(1 for r in rows if not r[0].startswith("good")),
        "accepted_rps": round(len(accepted) / max(r[4] + r[2] for r in rows), 2) if rows else None,
        "accepted_p50_ms": percentile(accepted, 50),
        "accepted_p99_ms": percentile(accepted, 99),
        "shed_p99_ms": percentile([r[2] for r in shed], 99),
        "max_ms": round(max(r[2] for r in rows) * 1000, 1) if rows else None,
        "killed_replica": killed,
        "killed_at_s": round(killed_at, 1) if killed_at is not None else None,
    }


def build_run(run: Path) -> None:
    """A small trained run (synthetic images, two quick models) for the soak, made with the lesion CLI."""
    lesion = [sys.executable, "-m", "pipelines.cli"]
    if not (run / "data").is_dir():
        subprocess.run(lesion + ["ingest", "--run", str(run), "--source", "synthetic", "--count", "210",
                                 "--image-size", "64"], check=True, cwd=ROOT)
    for model in ("scratch_cnn", "mobilenetv2"):
        if not (run / "models" / model / "best.pt").is_file():
            subprocess.run(lesion + ["train", "--run", str(run), "--model", model, "--epochs", "2"], check=True, cwd=ROOT)


def compared_rows(result: dict) -> list[dict]:
    """The accepted requests' latency beside the unbounded queue's soak (``ratio`` = now / then)."""
    if not UNBOUNDED.is_file():
        return []
    before = json.loads(UNBOUNDED.read_text())
    rows = []
    for now_key, then_key in (("accepted_p99_ms", "p99_ms"), ("accepted_p50_ms", "p50_ms")):
        if result.get(now_key) and before.get(then_key):
            rows.append({"figure": now_key, "shedding": result[now_key], "unbounded_queue": before[then_key],
                         "ratio": round(result[now_key] / before[then_key], 3)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained run (default: build a small synthetic one under runs/soak)")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long requests arrive")
    parser.add_argument("--factor", type=float, default=2.0, help="arrival rate as a multiple of the measured capacity")
    parser.add_argument("--capacity-seconds", type=float, default=20.0, help="how long the capacity is measured")
    parser.add_argument("--kill-at", type=float, default=None,
                        help="seconds in to kill a model replica (default: a third of the way; negative: never)")
    parser.add_argument("--timeout", type=float, default=30.0, help="a request unanswered after this is lost")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    run_path = Path(args.run or ROOT / "runs" / "soak").resolve()
    if not args.run:
        build_run(run_path)

    import ray
    from ray import serve

    from pipelines import serve as served
    from pipelines.common import init_ray, resolve_config

    run = RunDir(run_path)
    config = resolve_config(run, None, {"serve.port": args.port, "serve.max_replicas": 1})
    init_ray()
    started = time.perf_counter()
    url = served.deploy(config, run)
    startup_s = time.perf_counter() - started
    images = good_images()
    for _ in range(3):  # warm-up
        send(f"{url}/v1/predict", request_mix(images)[0][1], 60)
    rss_start = memory_bytes(serve_pids(), "rss")
    clients = config.serve.max_pending_requests or 16
    rate = capacity(url, images, clients, args.capacity_seconds)
    kill_at = None if args.kill_at is not None and args.kill_at < 0 else (args.kill_at or args.seconds / 3)
    result = soak(url, images, args.factor * rate, args.seconds, kill_at, args.timeout)
    time.sleep(2)
    rss_end = memory_bytes(serve_pids(), "rss")
    result = {
        "benchmark": "soak-shedding",
        "command": "python -m benchmarks.soak " + shlex.join(sys.argv[1:]),
        "capacity_rps": round(rate, 2),
        "capacity_clients": clients,
        "factor": args.factor,
        "max_pending_requests": config.serve.max_pending_requests,
        **result,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "serve_startup_s": round(startup_s, 1),
        "seconds": args.seconds,
        "run": str(run_path),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "versions": package_versions(),
    }
    result["rows"] = compared_rows(result)
    serve.shutdown()
    ray.shutdown()
    out = save_result("soak-shedding", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "machine")}, indent=2))
    print(f"wrote {out}")
    return 0 if result["lost"] == 0 and result["misanswered"] == 0 and result["slow_over_5s"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
