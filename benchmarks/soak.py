"""Soak: the served API under mixed good and bad requests from 16 clients while a model replica is killed and restarts.

Bounded in time and sent to loopback only. Each client sends, in a fixed mix, real JPEG uploads (good), and bad ones:
not an image, a truncated JPEG, an empty body, a wrong content type, a tiny image and bad base64. A 503 is retried once
after its Retry-After; a request is *lost* when it ends with neither 2xx nor 4xx after that retry (a 5xx, a dropped
connection or a timeout), and the target is 0 lost. Part-way through, one model replica is killed with ``ray.kill``;
Serve's controller starts a new one. The summed RSS of Serve's HTTP proxy and every replica is read from /proc after
warm-up and at the end.

    python benchmarks/soak.py [--run RUN_DIR] [--seconds 120] [--clients 16]

Without ``--run`` it builds a small synthetic run (two models) under runs/soak. Writes benchmarks/results/soak.json
and the soak section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lesion.rundir import RunDir, package_versions  # noqa: E402
from shared import cpu_model, memory_bytes, write_section  # noqa: E402  (benchmarks/shared.py, beside this script)

IMAGES = ROOT.parent / "shared" / "data" / "ham10000-fullres" / "images"
RESULT = ROOT / "benchmarks" / "results" / "soak.json"


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
    """(label, requests.post kwargs) in the order each client cycles through: 2 good uploads to 1 bad one."""
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


def send(url: str, kwargs: dict, timeout: float = 60.0) -> tuple[int, float, bool]:
    """POST once, retrying a 503 once after its Retry-After: (final status or 0 for no answer, seconds, retried)."""
    start = time.perf_counter()
    retried = False
    for attempt in range(2):
        try:
            reply = requests.post(url, timeout=timeout, **kwargs)
        except requests.RequestException:
            return 0, time.perf_counter() - start, retried
        if reply.status_code != 503 or attempt == 1:
            return reply.status_code, time.perf_counter() - start, retried
        retried = True
        time.sleep(float(reply.headers.get("Retry-After", "1")))
    raise AssertionError("unreachable")


def serve_pids() -> list[int]:
    """PIDs of Serve's HTTP proxy and every replica that is alive now."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True,
                         limit=1000, raise_on_missing_output=False)
    return [a.pid for a in actors if a.pid and ("ServeReplica" in a.class_name or "ProxyActor" in a.class_name)]


def kill_one_model_replica() -> str:
    """Kill one replica of a model deployment; Serve's controller replaces it. Returns the actor's name."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True,
                         limit=1000, raise_on_missing_output=False)
    replicas = [a for a in actors if "ServeReplica" in a.class_name and "model_" in a.class_name]
    if not replicas:
        raise RuntimeError("no model replica to kill: " + ", ".join(a.class_name for a in actors))
    victim = replicas[0]
    ray.kill(ray.get_actor(victim.name, namespace=victim.ray_namespace), no_restart=False)
    return victim.class_name


def soak(url: str, images: list[bytes], clients: int, seconds: float, kill_at: float) -> dict:
    """Send the mix from ``clients`` threads for ``seconds``; kill a model replica at ``kill_at`` seconds."""
    mix = request_mix(images)
    stop = threading.Event()
    rows: list[tuple[str, int, float, bool, float]] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client(index: int) -> None:
        k = index
        while not stop.is_set():
            label, kwargs = mix[k % len(mix)]
            status, seconds_taken, retried = send(f"{url}/v1/predict", kwargs)
            with lock:
                rows.append((label, status, seconds_taken, retried, time.perf_counter() - t0))
            k += 1

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        time.sleep(kill_at)
        killed = kill_one_model_replica()
        killed_at = time.perf_counter() - t0
        time.sleep(max(0.0, seconds - kill_at))
        stop.set()
        for future in futures:
            future.result()
    return summarise(rows, killed, killed_at)


def summarise(rows: list[tuple[str, int, float, bool, float]], killed: str, killed_at: float) -> dict:
    """Counts by status and by kind, lost requests, latency percentiles."""
    statuses: dict[str, int] = {}
    for _, status, *_ in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    lost = [r for r in rows if not (200 <= r[1] < 300 or 400 <= r[1] < 500)]
    wrong = [r for r in rows if (r[0].startswith("good") and r[1] != 200) or (not r[0].startswith("good") and r[1] == 200)]
    latencies = np.array([r[2] for r in rows]) * 1000
    return {
        "requests": len(rows),
        "by_status": statuses,
        "lost": len(lost),
        "lost_examples": [{"kind": r[0], "status": r[1], "at_s": round(r[4], 1)} for r in lost[:10]],
        "misanswered": len(wrong),
        "retried_after_503": sum(1 for r in rows if r[3]),
        "good": sum(1 for r in rows if r[0].startswith("good")),
        "bad": sum(1 for r in rows if not r[0].startswith("good")),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(rows) else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(rows) else None,
        "killed_replica": killed,
        "killed_at_s": round(killed_at, 1),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained run (default: build a small synthetic one under runs/soak)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the clients send")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-at", type=float, default=None, help="seconds in (default: a third of the way)")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    run_path = Path(args.run or ROOT / "runs" / "soak").resolve()
    if not args.run:
        build_run(run_path)

    import ray
    from pipelines.common import init_ray, resolve_config
    from pipelines import serve as served

    run = RunDir(run_path)
    config = resolve_config(run, None, {"serve.port": args.port, "serve.max_replicas": 1})
    init_ray()
    started = time.perf_counter()
    url = served.deploy(config, run)
    startup_s = time.perf_counter() - started
    images = good_images()
    for _ in range(3):  # warm-up
        send(f"{url}/v1/predict", request_mix(images)[0][1])
    rss_start = memory_bytes(serve_pids(), "rss")
    result = soak(url, images, args.clients, args.seconds, args.kill_at or args.seconds / 3)
    time.sleep(2)
    rss_end = memory_bytes(serve_pids(), "rss")
    result.update({
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_start - 1, 4) if rss_start else None,
        "serve_startup_s": round(startup_s, 1),
        "clients": args.clients,
        "seconds": args.seconds,
        "run": str(run_path),
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": package_versions(),
    })
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    write_readme(result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "machine")}, indent=2))
    return 0 if result["lost"] == 0 and result["misanswered"] == 0 else 1


def write_readme(result: dict) -> None:
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(result["by_status"].items()))
    write_section("soak", f"""
## Soak (`benchmarks/soak.py`)

`{result['command']}` on {result['machine']['cpu']} ({result['machine']['cores']} cores): {result['clients']} clients
for {result['seconds']:g} s, a mix of good uploads and bad ones (not an image, truncated, empty, wrong type, too small,
bad base64); `{result['killed_replica']}` killed at {result['killed_at_s']} s.

| requests | good / bad | by status | retried after 503 | lost | misanswered | p50 | p99 | RSS proxy + replicas, start → end |
|---|---|---|---|---|---|---|---|---|
| {result['requests']} | {result['good']} / {result['bad']} | {statuses} | {result['retried_after_503']} | {result['lost']} | {result['misanswered']} | {result['p50_ms']} ms | {result['p99_ms']} ms | {result['rss_start_mb']} → {result['rss_end_mb']} MB ({result['rss_growth']:+.1%}) |
""")


if __name__ == "__main__":
    sys.exit(main())
