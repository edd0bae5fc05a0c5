"""The schedule of a whole study on a GPU cluster, as ``lesion run`` would run it (the graph) and one stage at a time,
with stage times estimated from per-epoch times given as inputs.

The plan comes from the workflow itself (``pipelines.workflow.build_graph`` and ``fits_beside``): an event-driven
simulation starts each node as soon as its inputs are made and it fits beside the running ones. Stage time =
epochs x seconds per epoch of that model; tuning = trials x epochs per trial x seconds per trial epoch / trials at
once (every trial runs all its epochs: ASHA's early stops make the real search shorter). Every per-epoch time not
given with ``--epoch-seconds`` is ONE UNIT (one DDP epoch of a model), and the makespans are in those units: the
plan's shape and the DAG-vs-sequential ratio, not wall time.
A trial epoch (one worker doing the work of the model's ``workers``) defaults to ``workers`` units.

    python -m benchmarks.plan [--config cluster/configs/ham10000.yaml] [--cluster '{"GPU": 8, ...}']
        [--epoch-seconds resnet50=41.0 ...]   # measured figures, when there are some
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lesion.config import Config, apply_overrides, load_config
from pipelines.capacity import Cluster, tune_concurrency
from pipelines.stages import Stage
from pipelines.workflow import build_graph, check_graph, fits_beside

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"


def durations(config: Config, nodes: list[Stage], cluster: Cluster, epoch_seconds: dict[str, float],
              evaluate_units: float) -> dict[str, float]:
    """Estimated time of each node (ingest 0: the same in both schedules)."""
    out = {}
    for node in nodes:
        if node.kind == "train":
            name = node.name.removeprefix("train ")
            out[node.name] = config.model_config(name).epochs * epoch_seconds.get(name, 1.0)
        elif node.kind == "tune":
            tcfg, model = config.tune, config.tune.model
            trial_epoch = epoch_seconds.get(f"trial:{model}", config.model_config(model).workers
                                            * epoch_seconds.get(model, 1.0))
            out[node.name] = tcfg.trials * tcfg.epochs * trial_epoch / tune_concurrency(config, cluster)
        else:
            out[node.name] = evaluate_units if node.kind == "evaluate" else 0.0
    return out


def simulate(nodes: list[Stage], cluster: Cluster, took: dict[str, float], max_trainings: int | None
             ) -> tuple[float, list[dict]]:
    """Event-driven schedule: (makespan, [{node, start, end}])."""
    now, running, done, timeline = 0.0, {}, set(), []
    pending = list(nodes)
    while pending or running:
        for node in list(pending):
            if set(node.inputs) <= done and (not running or fits_beside(list(running.values()), node, cluster,
                                                                       max_trainings)):
                pending.remove(node)
                running[node.name] = node
                timeline.append({"node": node.name, "start": now, "end": now + took[node.name]})
        ends = {entry["node"]: entry["end"] for entry in timeline if entry["node"] in running}
        first = min(ends, key=ends.get)
        now = ends[first]
        done.add(first)
        running.pop(first)
    return now, timeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "cluster" / "configs" / "ham10000.yaml"))
    parser.add_argument("--cluster", default='{"GPU": 8, "CPU": 64, "nodes": 2}', help="simulated cluster (JSON)")
    parser.add_argument("--epoch-seconds", action="append", default=[], metavar="MODEL=SECONDS",
                        help="measured seconds per DDP epoch of MODEL (trial:MODEL for a tuning trial's epoch)")
    parser.add_argument("--evaluate-units", type=float, default=1.0, help="evaluation time, in the same units")
    parser.add_argument("--out", default=str(RESULTS / "plan.json"))
    args = parser.parse_args(argv)
    config, cluster = load_config(args.config), Cluster.parse(args.cluster)
    given = {key: float(value) for key, _, value in (item.partition("=") for item in args.epoch_seconds)}
    nodes = build_graph(config, cluster)
    check_graph(nodes, cluster)
    took = durations(config, nodes, cluster, given, args.evaluate_units)
    dag_time, dag = simulate(nodes, cluster, took, config.workflow.max_parallel_trainings)
    one_at_a_time = apply_overrides(config, {"workflow.max_parallel_trainings": 1})
    seq_time = sum(took.values())
    capped_time, _ = simulate(nodes, cluster, took, one_at_a_time.workflow.max_parallel_trainings)
    result = {
        "config": str(Path(args.config).resolve().relative_to(ROOT)), "cluster": json.loads(args.cluster),
        "units": "seconds" if given else "one DDP epoch of a model (--epoch-seconds gives seconds)",
        "epoch_seconds_given": given,
        "node_time": took, "dag": {"makespan": dag_time, "timeline": dag},
        "sequential": {"makespan": seq_time, "note": "every stage one after another"},
        "one_training_at_a_time": {"makespan": capped_time, "note": "the graph with max_parallel_trainings: 1"},
        "speedup_vs_sequential": seq_time / dag_time if dag_time else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['config']} on {args.cluster}, times in {result['units']}")
    for entry in dag:
        print(f"  {entry['node']:<26} {entry['start']:>8.1f} -> {entry['end']:>8.1f}")
    print(f"makespan: graph {dag_time:.1f}, one training at a time {capped_time:.1f}, sequential {seq_time:.1f} "
          f"(x{result['speedup_vs_sequential']:.2f}); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
