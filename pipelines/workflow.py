"""``lesion run``: the whole workflow as a graph of stages (``pipelines.stages``), scheduled on the Ray cluster.

``lesion run``: a graph of stages keyed by their inputs: ingest -> {tune the custom CNN -> train it with the tuned
config}, train every other configured variant -> evaluate with the ensemble -> optionally serve. A node starts once
its inputs are made and the cluster has room for it beside the running ones (``pipelines.capacity``): tuning runs
beside the other trainings, independent trainings run at once, each in a thread of this driver with its own
TorchTrainer; on a small machine they run one at a time. ``--plan`` prints the schedule as waves without running it.
A node whose artefact was already made in the same run directory from the same inputs is skipped: each stage records
its artefact in the manifest with a fingerprint of its inputs, its config section and its version constant, and the
workflow asks the stage (``Stage.is_current``) before running it. A failed node blocks only what needs it; its
siblings finish, the run exits non-zero naming it and its log (``RUN/logs/<node>.log``), and a re-run retries only
it. The stages are called as functions, never through the command line. One table (``pipelines.status``, also
``RUN/status.json`` for ``lesion status``) shows every node's status and time as the run goes. The run directory may
be a URI (``s3://bucket/run``): it is pulled at the start and each node's artefact is pushed when the node finishes.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from lesion.config import Config, apply_overrides, load_config
from lesion.rundir import RunDir
from pipelines import capacity, tracking
from pipelines.common import RUN_CONFIG, init_ray, parse_sets, record_run_config, resolve_config
from pipelines.stages import Stage, Train, Tune
from pipelines.status import STATUS_FILE, StageTable

log = logging.getLogger(__name__)

DEFAULT_RUN = "runs/demo"
HEARTBEAT_S = 60.0  # a line naming the running nodes at least this often
GPUS_PER_PLANNED_NODE = 4  # `--plan-gpus N` plans for nodes of up to this many GPUs


# --------------------------------------------------------------------------------------------- the workflow


def workflow_config(config: Config, *, workers: int | None = None, gpus: float | None = None,
                    tune: bool | None = None, serve: bool | None = None) -> Config:
    """``config`` with the flags of ``lesion run`` applied (None = keep the config's value).

    ``gpus`` is the GPU share of every Ray actor that can use one: train workers, tune trials, evaluation actors and
    serve replicas (0 = CPU only).
    """
    overrides: dict[str, Any] = {"train.workers": workers, "workflow.tune": tune, "workflow.serve": serve}
    if gpus is not None:
        overrides.update({"train.gpus_per_worker": gpus, "tune.gpus_per_trial": gpus,
                          "evaluate.gpus_per_actor": gpus, "serve.gpus_per_replica": gpus})
    # Per-model sections may set these too; the flag beats them.
    for name, section in config.train.models.items():
        if workers is not None and "workers" in section:
            overrides[f"train.models.{name}.workers"] = workers
        if gpus is not None and "gpus_per_worker" in section:
            overrides[f"train.models.{name}.gpus_per_worker"] = gpus
    return apply_overrides(config, overrides)


# --------------------------------------------------------------------------------------------- the graph


def tuned_variants(config: Config) -> list[str]:
    """The ``train.models`` variants that ``RUN/tune/best.yaml`` sets (every variant of the architecture
    ``tune.model``), when tuning is on."""
    return list(config.variants_of(config.tune.model)) if config.workflow.tune else []


def build_graph(config: Config, cluster: capacity.Cluster) -> list[Stage]:
    """The stages of the workflow in start order: ingest; tuning beside the trainings it does not feed; one training
    per ``train.models`` variant; evaluation after every training."""
    from pipelines.evaluate import Evaluate  # with torch: loaded once the graph is wanted, after the run is locked
    from pipelines.ingest import Ingest

    nodes: list[Stage] = [Ingest()]
    tuned = tuned_variants(config)
    if tuned:
        concurrent = capacity.tune_concurrency(config, cluster)
        nodes.append(Tune(model=config.tune.model, inputs=("ingest",),
                          needs=tuple(capacity.tune_needs(config, concurrent))))
    for name in config.train.models:
        inputs = ("ingest", f"tune {config.tune.model}") if name in tuned else ("ingest",)
        nodes.append(Train(variant=name, inputs=inputs,
                           needs=tuple(capacity.train_needs(name, config.model_config(name)))))
    trainings = tuple(node.name for node in nodes if node.kind == "train")
    nodes.append(Evaluate(inputs=trainings or ("ingest",), needs=tuple(capacity.evaluate_needs(config)),
                          site=config.inference.site))
    return nodes


def combined_needs(nodes: list[Stage]) -> list[capacity.Need]:
    """What ``nodes`` ask for together. Identical rows are one shared slot: concurrent trainings take turns on the
    CPU kept free for Ray Data reads rather than each holding one."""
    return list(dict.fromkeys(need for node in nodes for need in node.needs))


def fits_beside(running: list[Stage], node: Stage, cluster: capacity.Cluster, max_trainings: int | None) -> bool:
    """Whether ``node`` can start while ``running`` run: an exclusive node only alone, at most ``max_trainings``
    trainings at once, and everything together within the cluster."""
    if node.exclusive or any(other.exclusive for other in running):
        return not running
    if node.kind == "train" and max_trainings and sum(o.kind == "train" for o in running) >= max_trainings:
        return False
    return not capacity.shortfalls(combined_needs([*running, node]), cluster)


def check_graph(nodes: list[Stage], cluster: capacity.Cluster) -> None:
    """Every node must fit the cluster alone: ``CapacityError`` naming each one that does not (on an autoscaling
    cluster, warnings instead)."""
    problems = [f"{node.name}: {'; '.join(found)}" for node in nodes
                if (found := capacity.shortfalls(list(node.needs), cluster))]
    if problems and cluster.autoscaling:
        for node in nodes:
            capacity.check(f"lesion run: {node.name}", list(node.needs), cluster)
    elif problems:
        raise capacity.CapacityError("lesion run cannot start on this cluster: " + " | ".join(problems))


def plan_waves(nodes: list[Stage], cluster: capacity.Cluster, max_trainings: int | None = None) -> list[list[Stage]]:
    """The schedule as waves: each wave holds the nodes whose inputs are made and that fit the cluster together
    (in start order); a node too large for the cluster (an autoscaling one) gets a wave of its own."""
    done: set[str] = set()
    left, waves = list(nodes), []
    while left:
        ready = [node for node in left if set(node.inputs) <= done]
        wave: list[Stage] = []
        for node in ready:
            if fits_beside(wave, node, cluster, max_trainings):
                wave.append(node)
        wave = wave or ready[:1]
        waves.append(wave)
        done |= {node.name for node in wave}
        left = [node for node in left if node not in wave]
    return waves


def describe_needs(node: Stage) -> str:
    """``4 x (1 CPU, 1 GPU) DDP workers + 1 x 1 CPU Ray Data reading = 5 CPU, 4 GPU``."""
    if node.exclusive:
        return "the whole cluster (Ray Data tasks)"
    parts = [f"{need.count} x ({need.cpu:g} CPU" + (f", {need.gpu:g} GPU)" if need.gpu else ")")
             + f" {need.what.split(': ')[-1]}" for need in node.needs]
    cpu = sum(need.total("cpu") for need in node.needs)
    gpu = sum(need.total("gpu") for need in node.needs)
    return " + ".join(parts) + f" = {cpu:g} CPU" + (f", {gpu:g} GPU" if gpu else "")


def plan_text(waves: list[list[Stage]], cluster: capacity.Cluster) -> str:
    """The plan as ``lesion run --plan`` prints it: one block per wave, each node with its resources."""
    total = sum(len(wave) for wave in waves)
    lines = [f"plan on {cluster.cpu:g} CPU, {cluster.gpu:g} GPU, {cluster.nodes} node(s): {total} stages in "
             f"{len(waves)} wave(s) (one at a time: {total})"]
    for index, wave in enumerate(waves, 1):
        for position, node in enumerate(wave):
            label = f"wave {index}" if position == 0 else ""
            lines.append(f"  {label:<8} {node.name:<26} {describe_needs(node)}")
    return "\n".join(lines)


def planning_cluster(resources: str | None, gpus: int | None) -> capacity.Cluster:
    """The cluster ``--plan`` plans for: ``--cluster-resources`` JSON, else ``--plan-gpus N`` (nodes of up to 4 GPUs
    with 8 CPUs per GPU), else this machine (its CPUs and CUDA devices); no Ray is started."""
    if resources:
        return capacity.Cluster.parse(resources)
    if gpus:
        nodes = max(1, -(-gpus // GPUS_PER_PLANNED_NODE))
        return capacity.Cluster(cpu=8.0 * gpus, gpu=float(gpus), nodes=nodes, node_cpu=8.0 * gpus / nodes,
                                node_gpu=gpus / nodes)
    import torch

    return capacity.Cluster(cpu=float(os.cpu_count() or 1), gpu=float(torch.cuda.device_count()))


# --------------------------------------------------------------------------------------------- the workflow


class WorkflowError(RuntimeError):
    """Some nodes of ``lesion run`` failed; every other node's result is kept."""

    def __init__(self, failures: dict[str, tuple[BaseException, Path]]):
        self.failures = failures
        super().__init__("; ".join(f"{name} failed: {_last_line(error)} (log: {path})"
                                   for name, (error, path) in failures.items()))


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


class _NodeLog(logging.Handler):
    """Copies the driver-side log records of one node's thread into ``RUN/logs/<node>.log``."""

    def __init__(self, path: Path, thread: str):
        super().__init__(logging.INFO)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.thread = path, thread
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName == self.thread:
            with open(self.path, "a") as out:
                out.write(self.format(record) + "\n")


def run_workflow(config: Config, run: RunDir, table: StageTable | None = None) -> dict[str, Any]:
    """Run the graph of ``build_graph`` on ``run``: each node once its inputs are made and the cluster has room
    beside the running ones (``workflow.max_parallel_trainings`` caps trainings), each in a thread of this driver;
    nodes whose artefact is current (same fingerprint) are skipped. A failed node's dependants are blocked while
    its siblings finish; then ``WorkflowError`` names it. Returns each node's result.

    Serving (``config.workflow.serve``) is left to the caller, since it blocks.
    """
    table = table or StageTable(f"lesion run {run.uri}")
    init_ray()
    cluster = capacity.Cluster.of_ray(autoscaling=config.workflow.autoscaling)
    nodes = build_graph(config, cluster)
    check_graph(nodes, cluster)
    from pipelines.train import required_weights

    required_weights(config, [node.variant for node in nodes if isinstance(node, Train)])  # before any stage starts
    for node in nodes:
        if node.name not in table.rows:
            table.add(node.name, describe_needs(node))
    runner = _NodeRunner(config, run, table)
    outcome: dict[str, str] = {}  # node -> ok | failed | blocked
    failures: dict[str, tuple[BaseException, Path]] = {}
    finished: queue.Queue = queue.Queue()
    running: dict[str, Stage] = {}
    pending = list(nodes)
    while pending or running:
        for node in list(pending):
            blocked_by = [dep for dep in node.inputs if outcome.get(dep) in ("failed", "blocked")]
            if blocked_by:
                outcome[node.name] = "blocked"
                table.end(node.name, "blocked", None, f"needs {', '.join(blocked_by)}")
                pending.remove(node)
            elif all(outcome.get(dep) == "ok" for dep in node.inputs) and (
                    not running or fits_beside(list(running.values()), node, cluster,
                                               config.workflow.max_parallel_trainings)):
                pending.remove(node)
                running[node.name] = node
                threading.Thread(target=lambda n=node: finished.put((n.name, runner.execute(n))),
                                 name=f"lesion-node {node.name}", daemon=True).start()
        if not running:
            continue
        try:
            name, error = finished.get(timeout=HEARTBEAT_S)
        except queue.Empty:
            table.heartbeat()
            continue
        running.pop(name)
        outcome[name] = "ok" if error is None else "failed"
        if error is not None:
            failures[name] = (error, runner.log_path(name))
    if failures:
        raise WorkflowError(failures)
    return runner.results


class _NodeRunner:
    """Runs one stage (in its own thread): asks it whether it is current, runs it, pushes its artefact, and keeps its
    row of the stage table."""

    def __init__(self, config: Config, run: RunDir, table: StageTable):
        self.run, self.table = run, table
        self.configured = config  # as the stages done so far leave it (``Stage.configure``: tuning's best config)
        self.configuring = threading.Lock()  # stages finishing at once in their threads change it one at a time
        self.results: dict[str, Any] = {}

    def log_path(self, name: str) -> Path:
        return self.run.root / "logs" / f"{name.replace(' ', '-')}.log"

    def execute(self, node: Stage) -> BaseException | None:
        """Run ``node``; returns its error (None when it succeeded or was current): never raises, so the scheduler
        always hears back."""
        handler = _NodeLog(self.log_path(node.name), threading.current_thread().name)
        logging.getLogger().addHandler(handler)
        started = time.perf_counter()
        try:
            config = self.configured  # its inputs are done: what they made of the config is in it
            current = node.is_current(config, self.run)
            with tracking.stage_run(self.run, node.name, node.kind, cached=current):  # an MLflow child run
                self._stage(node, config, current)
            return None
        except BaseException as exc:  # reported by the scheduler; the siblings go on
            with open(handler.path, "a") as out:
                traceback.print_exception(exc, file=out)
            log.error("%s failed: %s (log: %s)", node.name, _last_line(exc), handler.path)
            self.table.end(node.name, "failed", time.perf_counter() - started, f"log: {handler.path}")
            self._push()
            return exc
        finally:
            logging.getLogger().removeHandler(handler)

    def _stage(self, node: Stage, config: Config, current: bool) -> None:
        """Run ``node`` with ``config`` unless it is ``current``; either way, the config of the stages after it
        follows."""
        table, run = self.table, self.run
        if current:
            table.end(node.name, node.current_status, None, "up to date (same fingerprint)")
        else:
            table.begin(node.name, str(self.log_path(node.name)))
            started = time.perf_counter()
            result = node.run(config, run)
            self._push(node.artefact(run))
            table.end(node.name, "done", time.perf_counter() - started, node.summary(result))
            self.results[node.name] = result
        with self.configuring:
            self.configured = node.configure(self.configured, run)

    def _push(self, *parts: str) -> None:
        """Push ``parts``, the stage table and the node logs (a remote run)."""
        self.run.push(*[part for part in (*parts, STATUS_FILE, "logs") if (self.run.root / part).exists()])


# --------------------------------------------------------------------------------------------- command line


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Flags of ``lesion run``."""
    parser.add_argument("--run", default=DEFAULT_RUN,
                        help=f"run directory: a path or a URI such as s3://bucket/run (default {DEFAULT_RUN})")
    parser.add_argument("--config", help="workflow config YAML (default: RUN/config.yaml, else the built-in demo)")
    parser.add_argument("--workers", type=int, help="Ray Train workers per model")
    parser.add_argument("--gpus", type=float,
                        help="GPU share of each train worker, tune trial, evaluation actor and serve replica")
    parser.add_argument("--serve", action="store_true", default=None, help="serve the ensemble at the end")
    parser.add_argument("--no-tune", dest="tune", action="store_false", default=None,
                        help="skip tuning the custom CNN")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set data.root=/mnt/data/HAM10000 "
                             "(VALUE is read as YAML; repeatable)")
    parser.add_argument("--plan", action="store_true",
                        help="print the schedule (waves of stages with their resources) without running it")
    parser.add_argument("--plan-gpus", type=int, metavar="N",
                        help=f"--plan for a cluster of N GPUs (nodes of up to {GPUS_PER_PLANNED_NODE} GPUs, "
                             "8 CPUs per GPU)")
    parser.add_argument("--cluster-resources", metavar="JSON",
                        help='--plan for this cluster, e.g. \'{"GPU": 8, "CPU": 64, "nodes": 2}\'')


def run_command(name: str, args: argparse.Namespace) -> int:
    """``lesion run``: the plan (``--plan``), or the workflow with the run locked for this process."""
    run = RunDir(args.run)
    if args.plan:
        config = resolve_config(run, args.config, parse_sets(args.set))  # writes nothing
        config = workflow_config(config, workers=args.workers, gpus=args.gpus, tune=args.tune, serve=args.serve)
        cluster = planning_cluster(args.cluster_resources, args.plan_gpus)
        nodes = build_graph(config, cluster)
        check_graph(nodes, cluster)
        print(plan_text(plan_waves(nodes, cluster, config.workflow.max_parallel_trainings), cluster))
        return 0
    with run.lock("lesion run"):
        return _run_locked(run, args)


def _run_locked(run: RunDir, args: argparse.Namespace) -> int:
    """``lesion run``'s body, with the run locked for this process."""
    run.pull()
    config = resolve_config(run, args.config, parse_sets(args.set))
    config = workflow_config(config, workers=args.workers, gpus=args.gpus, tune=args.tune, serve=args.serve)
    record_workflow_config(run, config, args.config)
    table = StageTable(f"lesion run {run.uri}" + (f" (config {args.config})" if args.config else ""),
                       path=run.root / STATUS_FILE)
    print(table.title, flush=True)
    try:
        run_workflow(config, run, table)
    except WorkflowError as exc:
        table.finish("failed")
        print(table.summary(), flush=True)
        for name, (error, path) in exc.failures.items():
            print(f"lesion run: {name} failed: {_last_line(error)}\n  log: {path}", file=sys.stderr, flush=True)
        print("every other result is kept; run the same command again to retry only what failed",
              file=sys.stderr, flush=True)
        return 1
    except BaseException:
        table.finish("failed")
        print(table.summary(), flush=True)
        raise
    table.finish("done")
    print(table.summary(), flush=True)
    print(f"report: {run.eval / 'report.html'}")
    if config.workflow.serve:
        serve_workflow(config, run, detach=bool(os.environ.get("RAY_ADDRESS")))
    return 0


def record_workflow_config(run: RunDir, config: Config, config_path: str | None, out=None) -> None:
    """Make ``config`` the run's recorded config: a new run records it; an existing run whose recorded config
    differs has it replaced, with one line saying so."""
    recorded = run.root / RUN_CONFIG
    previous = load_config(recorded) if recorded.is_file() else None
    if previous == config:
        return
    record_run_config(run, config)
    if previous is not None:
        old, new = previous.to_dict(), config.to_dict()
        changed = ", ".join(key for key in new if old.get(key) != new.get(key))
        source = f"--config {config_path}" if config_path else "the flags"
        print(f"replaced the run's recorded config {recorded} with {source} (changed: {changed})",
              file=out or sys.stdout, flush=True)


def serve_workflow(config: Config, run: RunDir, *, detach: bool) -> None:
    """Serve the run's models; unless ``detach``, until Ctrl-C, then stop serving."""
    from pipelines.serve import serve_until_interrupted

    serve_until_interrupted(config, RunDir(run.root), detach=detach)  # Serve reads local folders: a staging copy

