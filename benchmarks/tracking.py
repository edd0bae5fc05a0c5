"""What MLflow tracking costs a training: ``lesion train`` of one model on an ingested run, timed without tracking,
with tracking to a real ``mlflow server`` (``.venv-mlflow``), and with that server killed mid-training.

    python -m benchmarks.tracking [--run RUN] [--model custom_cnn] [--repeats 2]

Writes ``benchmarks/results/tracking.json``: wall seconds of each command (the median of ``--repeats``; the killed
case ``--repeats`` times too, each with a fresh server), the ratio to the untracked training, the seconds a dead
server added (against the untracked and the tracked median; the spread of the untracked runs says how much of it
is the machine), and the machine's load averages before and after (the
figures are only as steady as the machine was). The run is ingested first when it has no data (the demo's synthetic
set). Tracked trainings log every epoch live from rank 0 (``pipelines.tracking.EpochLogger``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.shared import cpu_model, save_result

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       "HF_HUB_OFFLINE": "1"}


def lesion(*args: str) -> float:
    """Wall seconds of one ``lesion`` command (it must succeed)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def start_server(folder: Path):
    """A real MLflow server (the tests' helper; ``python -m`` from the repository root puts ``tests`` in reach)."""
    from tests.mlflow_server import MlflowServer

    return MlflowServer(folder)


def timed_trainings(run: str, model: str, repeats: int, server) -> dict[str, list[float]]:
    """Alternating untracked and tracked trainings, ``repeats`` of each."""
    train = ["train", "--run", run, "--model", model]
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        times["off"].append(lesion(*train))
        times["on"].append(lesion(*train, "--tracking-uri", server.url))
    return times


def killed_mid_training(run: str, model: str, server, after: float) -> float:
    """Wall seconds of a tracked training whose server is killed ``after`` seconds in."""
    killer = threading.Timer(after, server.stop)
    killer.start()
    try:
        return lesion("train", "--run", run, "--model", model, "--tracking-uri", server.url)
    finally:
        killer.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/bench-tracking")
    parser.add_argument("--model", default="custom_cnn")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not (Path(args.run) / "data" / "info.json").is_file():
        lesion("ingest", "--run", args.run)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "server")
        try:
            times = timed_trainings(args.run, args.model, args.repeats, server)
        finally:
            server.stop()
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        times["killed"] = []
        for k in range(args.repeats):  # a fresh server each time, killed half the fastest training in
            server = start_server(Path(tmp) / f"server-{k}")
            try:
                times["killed"].append(killed_mid_training(args.run, args.model, server,
                                                           after=min(times["off"] + times["on"]) / 2))
            finally:
                server.stop()
        killed = statistics.median(times["killed"])
    rows = [{"case": "tracking off", "seconds": round(off, 2), "ratio": 1.0},
            {"case": "tracking on (mlflow server)", "seconds": round(on, 2), "ratio": round(on / off, 4)},
            {"case": "server killed mid-training", "seconds": round(killed, 2), "ratio": round(killed / off, 4),
             "added_seconds": round(killed - off, 2), "added_to_tracked_seconds": round(killed - on, 2),
             "untracked_spread_seconds": round(max(times["off"]) - min(times["off"]), 2)}]
    result = {"command": " ".join(["python -m benchmarks.tracking", *(argv or sys.argv[1:])]),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "load_average_1_5_15_min": {"before": [round(x, 2) for x in load_before],
                                                      "after": [round(x, 2) for x in os.getloadavg()]}},
              "model": args.model,
              "runs": {key: [round(t, 2) for t in value] for key, value in times.items()}, "rows": rows}
    print(f"wrote {save_result('tracking', result)}")
    for row in rows:
        print(f"{row['case']:<30} {row['seconds']:>8.1f} s  x{row['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
