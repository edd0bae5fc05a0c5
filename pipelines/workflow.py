"""``lesion run`` (the whole workflow) and ``lesion cluster up|down`` (a real multi-node Ray cluster on this machine).

``lesion run``: a graph of stages keyed by their inputs: ingest -> {tune the custom CNN -> train it with the tuned
config}, train every other configured variant -> evaluate with the ensemble -> optionally serve. A node starts once
its inputs are made and the cluster has room for it beside the running ones (``pipelines.capacity``): tuning runs
beside the other trainings, independent trainings run at once, each in a thread of this driver with its own
TorchTrainer; on a small machine they run one at a time. ``--plan`` prints the schedule as waves without running it.
A node whose artefact was already made in the same run directory from the same inputs is skipped: each stage records
its artefact in the manifest with a fingerprint of its inputs, its config section and its version constant, and the
workflow asks the stage's own fingerprint function (``train_fingerprint``, ``tune_fingerprint``,
``evaluation_fingerprint``; ingest checks its own) before running it. A failed node blocks only what needs it; its
siblings finish, the run exits non-zero naming it and its log (``RUN/logs/<node>.log``), and a re-run retries only
it. The stages are called as functions, never through the command line. One table (``pipelines.status``, also
``RUN/status.json`` for ``lesion status``) shows every node's status and time as the run goes. The run directory may
be a URI (``s3://bucket/run``): it is pulled at the start and each node's artefact is pushed when the node finishes.

``lesion cluster up``: a head node and N worker nodes, each a separate ``ray start --block`` session with its
own ports, CPUs, object store and temp dir, all on 127.0.0.1. ``lesion cluster down`` ends exactly the processes
of those sessions (never ``ray stop``, which would stop every Ray on the machine). Token authentication is on
(a token is generated into ~/.ray/auth_token when there is none) unless ``RAY_AUTH_MODE=disabled`` is set, as the
tests do; a real cluster should keep it on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


from lesion.config import Config, apply_overrides, load_config
from lesion.rundir import RunDir
from pipelines import capacity
from pipelines.common import RUN_CONFIG, init_ray, parse_sets, record_run_config, resolve_config
from pipelines.status import STATUS_FILE, StageTable

log = logging.getLogger(__name__)

DEFAULT_RUN = "runs/demo"
CLUSTER_DIR = Path(os.environ.get("LESION_CLUSTER_DIR", "/tmp/lesion-cluster"))  # short: Ray's socket paths are capped
STATE_FILE = "cluster.json"
WORKER_PORTS = 100  # ports per node for Ray's worker processes
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


def model_fingerprint(config: Config, run: RunDir, name: str) -> str:
    """The fingerprint ``pipelines.train`` records for model ``name`` (``train_fingerprint``)."""
    from lesion.data.shards import read_info
    from pipelines.train import train_fingerprint

    return train_fingerprint(config.model_config(name), read_info(run.root))


# --------------------------------------------------------------------------------------------- the graph


@dataclasses.dataclass(frozen=True)
class Node:
    """One stage of ``lesion run``: what it waits for and what it asks Ray for while it runs."""

    name: str  # "ingest", "tune <model>", "train <variant>", "evaluate"
    kind: str  # ingest | tune | train | evaluate
    needs: tuple[capacity.Need, ...]
    after: tuple[str, ...] = ()
    exclusive: bool = False  # runs alone (ingest: Ray Data spreads over every CPU)


def tuned_variants(config: Config) -> list[str]:
    """The ``train.models`` variants that ``RUN/tune/best.yaml`` sets (every variant of the architecture
    ``tune.model``), when tuning is on."""
    return list(config.variants_of(config.tune.model)) if config.workflow.tune else []


def build_graph(config: Config, cluster: capacity.Cluster) -> list[Node]:
    """The nodes of the workflow in start order: ingest; tuning beside the trainings it does not feed; one training
    per ``train.models`` variant; evaluation after every training."""
    nodes = [Node("ingest", "ingest", (), exclusive=True)]
    tuned = tuned_variants(config)
    if tuned:
        concurrent = capacity.tune_concurrency(config, cluster)
        nodes.append(Node(f"tune {config.tune.model}", "tune", tuple(capacity.tune_needs(config, concurrent)),
                          ("ingest",)))
    for name in config.train.models:
        after = ("ingest", f"tune {config.tune.model}") if name in tuned else ("ingest",)
        nodes.append(Node(f"train {name}", "train", tuple(capacity.train_needs(name, config.model_config(name))),
                          after))
    trainings = tuple(node.name for node in nodes if node.kind == "train")
    nodes.append(Node("evaluate", "evaluate", tuple(capacity.evaluate_needs(config)), trainings or ("ingest",)))
    return nodes


def combined_needs(nodes: list[Node]) -> list[capacity.Need]:
    """What ``nodes`` ask for together. Identical rows are one shared slot: concurrent trainings take turns on the
    CPU kept free for Ray Data reads rather than each holding one."""
    return list(dict.fromkeys(need for node in nodes for need in node.needs))


def fits_beside(running: list[Node], node: Node, cluster: capacity.Cluster, max_trainings: int | None) -> bool:
    """Whether ``node`` can start while ``running`` run: an exclusive node only alone, at most ``max_trainings``
    trainings at once, and everything together within the cluster."""
    if node.exclusive or any(other.exclusive for other in running):
        return not running
    if node.kind == "train" and max_trainings and sum(o.kind == "train" for o in running) >= max_trainings:
        return False
    return not capacity.shortfalls(combined_needs([*running, node]), cluster)


def check_graph(nodes: list[Node], cluster: capacity.Cluster) -> None:
    """Every node must fit the cluster alone: ``CapacityError`` naming each one that does not (on an autoscaling
    cluster, warnings instead)."""
    problems = [f"{node.name}: {'; '.join(found)}" for node in nodes
                if (found := capacity.shortfalls(list(node.needs), cluster))]
    if problems and cluster.autoscaling:
        for node in nodes:
            capacity.check(f"lesion run: {node.name}", list(node.needs), cluster)
    elif problems:
        raise capacity.CapacityError("lesion run cannot start on this cluster: " + " | ".join(problems))


def plan_waves(nodes: list[Node], cluster: capacity.Cluster, max_trainings: int | None = None) -> list[list[Node]]:
    """The schedule as waves: each wave holds the nodes whose inputs are made and that fit the cluster together
    (in start order); a node too large for the cluster (an autoscaling one) gets a wave of its own."""
    done: set[str] = set()
    left, waves = list(nodes), []
    while left:
        ready = [node for node in left if set(node.after) <= done]
        wave: list[Node] = []
        for node in ready:
            if fits_beside(wave, node, cluster, max_trainings):
                wave.append(node)
        wave = wave or ready[:1]
        waves.append(wave)
        done |= {node.name for node in wave}
        left = [node for node in left if node not in wave]
    return waves


def describe_needs(node: Node) -> str:
    """``4 x (1 CPU, 1 GPU) DDP workers + 1 x 1 CPU Ray Data reading = 5 CPU, 4 GPU``."""
    if node.exclusive:
        return "the whole cluster (Ray Data tasks)"
    parts = [f"{need.count} x ({need.cpu:g} CPU" + (f", {need.gpu:g} GPU)" if need.gpu else ")")
             + f" {need.what.split(': ')[-1]}" for need in node.needs]
    cpu = sum(need.total("cpu") for need in node.needs)
    gpu = sum(need.total("gpu") for need in node.needs)
    return " + ".join(parts) + f" = {cpu:g} CPU" + (f", {gpu:g} GPU" if gpu else "")


def plan_text(waves: list[list[Node]], cluster: capacity.Cluster) -> str:
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
    for node in nodes:
        if node.name not in table.rows:
            table.add(node.name, describe_needs(node))
    runner = _NodeRunner(config, run, table)
    outcome: dict[str, str] = {}  # node -> ok | failed | blocked
    failures: dict[str, tuple[BaseException, Path]] = {}
    finished: queue.Queue = queue.Queue()
    running: dict[str, Node] = {}
    pending = list(nodes)
    while pending or running:
        for node in list(pending):
            blocked_by = [dep for dep in node.after if outcome.get(dep) in ("failed", "blocked")]
            if blocked_by:
                outcome[node.name] = "blocked"
                table.end(node.name, "blocked", None, f"needs {', '.join(blocked_by)}")
                pending.remove(node)
            elif all(outcome.get(dep) == "ok" for dep in node.after) and (
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
    """Runs one node (in its own thread): the fingerprint check, the stage function, the push, the table row."""

    def __init__(self, config: Config, run: RunDir, table: StageTable):
        self.config, self.run, self.table = config, run, table
        self.tuned = config  # + RUN/tune/best.yaml once the tune node is done
        self.results: dict[str, Any] = {}

    def log_path(self, name: str) -> Path:
        return self.run.root / "logs" / f"{name.replace(' ', '-')}.log"

    def execute(self, node: Node) -> BaseException | None:
        """Run ``node``; returns its error (None when it succeeded or was current): never raises, so the scheduler
        always hears back."""
        handler = _NodeLog(self.log_path(node.name), threading.current_thread().name)
        logging.getLogger().addHandler(handler)
        started = time.perf_counter()
        try:
            self._stage(node, *self._stage_parts(node))
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

    def _stage_parts(self, node: Node) -> tuple[str, Callable[[], Any], bool, Callable[[Any], str]]:
        """(artefact, function, current?, note) of ``node``."""
        from lesion.data.shards import read_info
        from pipelines.evaluate import evaluate, evaluation_fingerprint
        from pipelines.ingest import ingest
        from pipelines.train import train_model
        from pipelines.tune import tune_fingerprint, tune_model
        from pipelines.tuned import BEST_FILE

        run, config = self.run, self.tuned
        if node.kind == "ingest":
            return "data", lambda: ingest(config, run), False, lambda _: _ingest_note(run)
        if node.kind == "tune":
            current = ((run.tune / BEST_FILE).is_file()
                       and run.is_current("tune", tune_fingerprint(config, read_info(run.root))))
            return "tune", lambda: tune_model(config, run), current, _tune_note
        if node.kind == "train":
            name = node.name.removeprefix("train ")
            current = ((run.model_dir(name) / "best.pt").is_file()
                       and run.is_current(f"models/{name}", model_fingerprint(config, run, name)))
            return f"models/{name}", lambda: train_model(config, run, name), current, _train_note
        split = config.evaluate.split
        current = (run.eval / "metrics.json").is_file() and run.is_current(
            "eval", evaluation_fingerprint(config, run, split))
        return "eval", lambda: evaluate(config, run, split), current, _evaluate_note

    def _stage(self, node: Node, artefact: str, fn: Callable[[], Any], current: bool,
               note: Callable[[Any], str]) -> None:
        from pipelines.tuned import apply_best

        table, run = self.table, self.run
        if current:
            table.end(node.name, "skipped", None, "up to date (same fingerprint)")
        else:
            table.begin(node.name, str(self.log_path(node.name)))
            started = time.perf_counter()
            before = run.manifest().get(artefact)
            result = fn()
            self._push(artefact)
            # ingest and evaluate return early, without recording again, when their artefact is already current
            status = "current" if before is not None and run.manifest().get(artefact) == before else "done"
            table.end(node.name, status, time.perf_counter() - started, note(result))
            self.results[node.name] = result
        if node.kind == "tune":
            self.tuned = apply_best(self.config, run)

    def _push(self, *parts: str) -> None:
        """Push ``parts``, the stage table and the node logs (a remote run)."""
        self.run.push(*[part for part in (*parts, STATUS_FILE, "logs") if (self.run.root / part).exists()])


def _ingest_note(run: RunDir) -> str:
    from lesion.data.shards import read_info

    info = read_info(run.root)
    per_split = ", ".join(f"{split} {sum(counts.values())}" for split, counts in info["counts"].items())
    return f"{info['num_images']} images ({per_split}), {info['image_size']} px, {info['source']}"


def _tune_note(summary: dict) -> str:
    best = summary.get("best_value")
    return (f"{summary['trials_finished']} trials, best {summary['metric']} "
            + ("-" if best is None else f"{best:.3f}"))


def _train_note(summary: dict) -> str:
    return (f"best epoch {summary['best_epoch'] + 1}/{summary['epochs']}, val bal.acc "
            f"{summary['val_balanced_accuracy']:.3f}, {summary['pretrained']}")


def _evaluate_note(result: dict) -> str:
    ensemble = result["models"]["ensemble"]
    return f"{result['split']}: ensemble bal.acc {ensemble['balanced_accuracy']:.3f}, acc {ensemble['accuracy']:.3f}"


# --------------------------------------------------------------------------------------------- local cluster


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, taken: set[int] | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port the OS picks (never one of ``taken``)."""
    taken = taken if taken is not None else set()
    if preferred and preferred not in taken and _port_free(preferred):
        taken.add(preferred)
        return preferred
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def free_port_range(count: int, taken: set[int]) -> int:
    """The first of ``count`` consecutive free ports (none in ``taken``)."""
    for start in range(20000, 60000 - count, count):
        ports = range(start, start + count)
        if not taken.intersection(ports) and all(_port_free(p) for p in ports):
            taken.update(ports)
            return start
    raise RuntimeError(f"no {count} consecutive free ports between 20000 and 60000")


def _node_ports(taken: set[int]) -> list[str]:
    """`ray start` flags giving one node ports of its own, so that several nodes share this machine."""
    first = free_port_range(WORKER_PORTS, taken)
    return [
        f"--node-manager-port={free_port(None, taken)}", f"--object-manager-port={free_port(None, taken)}",
        f"--min-worker-port={first}", f"--max-worker-port={first + WORKER_PORTS - 1}",
        f"--dashboard-agent-listen-port={free_port(None, taken)}",
        f"--dashboard-agent-grpc-port={free_port(None, taken)}",
        f"--runtime-env-agent-port={free_port(None, taken)}", f"--metrics-export-port={free_port(None, taken)}",
    ]


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else "ray"


def start_local_cluster(workers: int = 1, cpus_per_node: float = 2, head_cpus: float | None = None,
                        gpus_per_node: int = 0, object_store_mb: int = 256, state_dir: Path = CLUSTER_DIR,
                        env: dict[str, str] | None = None, timeout: float = 180) -> dict[str, Any]:
    """Start a head and ``workers`` worker nodes on 127.0.0.1 and wait until all are alive; returns the cluster state.

    Every node is ``ray start --block`` in a session of its own with its own ports, temp dir and object store;
    the state (addresses, session leaders, logs) is saved to ``state_dir/cluster.json`` for ``stop_local_cluster``.
    Linux only (Ray supports multi-node clusters on Linux).
    """
    state_dir = Path(state_dir)
    if (state_dir / STATE_FILE).is_file():
        raise RuntimeError(f"a cluster is already up ({state_dir / STATE_FILE}): `lesion cluster down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    gcs_port = free_port(6379, taken)
    dashboard_port = free_port(8265, taken)
    client_port = free_port(10001, taken)
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")  # no 30 s Serve drain on `down`
    env["RAY_AUTH_MODE"] = env.get("RAY_AUTH_MODE", "token")  # every node the same; token unless disabled explicitly
    if env["RAY_AUTH_MODE"] == "token" and not _token_available(env):
        subprocess.run([_ray_executable(), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # writes ~/.ray/auth_token, read by every node and client here
    state: dict[str, Any] = {
        "auth_mode": env["RAY_AUTH_MODE"],
        "address": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "client": f"ray://127.0.0.1:{client_port}",
        "state_dir": str(state_dir),
        "nodes": [],
    }
    object_store = str(object_store_mb * 1024**2)
    try:
        for index in range(workers + 1):
            head = index == 0
            name = "head" if head else f"worker{index}"
            temp_dir = state_dir / name
            cpus = head_cpus if head and head_cpus is not None else cpus_per_node
            # Ray advertises this machine's address for 127.0.0.1 (services.resolve_ip_for_localhost) and its
            # gRPC servers listen on all interfaces: traffic stays on this machine, but a firewall must guard it.
            args = [_ray_executable(), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                    f"--num-cpus={cpus:g}", f"--num-gpus={gpus_per_node}", f"--object-store-memory={object_store}",
                    "--disable-usage-stats", *_node_ports(taken)]
            if head:
                args += ["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
            else:
                args += [f"--address={state['address']}"]
            log_path = state_dir / f"{name}.log"
            with open(log_path, "wb") as out:
                process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            state["nodes"].append({"name": name, "pid": process.pid, "cpus": cpus,
                                   "temp_dir": str(temp_dir), "log": str(log_path)})
            (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
            _wait_for_nodes(state, index + 1, process, log_path, timeout)
    except BaseException:
        stop_local_cluster(state_dir)
        raise
    return state


def _token_available(env: dict[str, str]) -> bool:
    home = Path(env.get("HOME", str(Path.home())))
    return bool(env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (home / ".ray" / "auth_token").is_file())


def _alive_nodes(dashboard: str) -> int:
    from ray.util.state import list_nodes

    return len(list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False,
                          timeout=10))


def _wait_for_nodes(state: dict, count: int, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"`ray start` exited with code {process.returncode}; end of {log_path}:\n{tail}")
        try:
            if _alive_nodes(state["dashboard"]) >= count:
                return
        except Exception as exc:  # the dashboard is not up yet
            log.debug("waiting for the dashboard: %s", exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} Ray node(s) not alive after {timeout:.0f}s; see {log_path}")
        time.sleep(1)


def node_processes(session: int) -> list[tuple[int, str]]:
    """(pid, command name) of every process in session ``session`` (Linux /proc).

    A node started by ``start_local_cluster`` is one session: ``ray start`` leads it, and Ray's worker processes,
    which get process groups of their own, stay in it.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":  # a zombie has ended (its parent has not reaped it yet)
            found.append((int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")]))
    return found


def stop_local_cluster(state_dir: Path = CLUSTER_DIR, timeout: float = 30) -> int:
    """End every process of a cluster started by ``start_local_cluster`` (workers first); returns nodes ended.

    SIGTERM lets ``ray start --block`` stop its node; whatever is left of the node's session after ``timeout``
    (workers, jobs' processes) gets SIGKILL. Nothing outside those sessions is touched.
    """
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return 0
    state = json.loads(path.read_text())
    ended = 0
    for node in reversed(state["nodes"]):
        session = node["pid"]
        if not node_processes(session):
            continue
        ended += 1
        try:
            os.kill(session, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while any(pid == session for pid, _ in node_processes(session)) and time.monotonic() < deadline:
            time.sleep(0.5)
        # Until the session is empty: a raylet may still be spawning a worker while its siblings are killed.
        deadline = time.monotonic() + timeout
        while (leftovers := node_processes(session)) and time.monotonic() < deadline:
            for pid, name in leftovers:
                log.info("killing %s (pid %d), left over from node %s", name, pid, node["name"])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        try:  # reap `ray start` when this process started it
            os.waitpid(session, os.WNOHANG)
        except ChildProcessError:
            pass
    path.unlink()
    return ended


# --------------------------------------------------------------------------------------------- command line


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "run":
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
        return
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    parser.add_argument("--cpus-per-node", type=float, default=2, help="logical CPUs of each node (default 2)")
    parser.add_argument("--head-cpus", type=float, help="logical CPUs of the head (default --cpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs of each node (default 0)")
    parser.add_argument("--object-store-mb", type=int, default=256, help="object store of each node (default 256)")
    parser.add_argument("--dir", default=str(CLUSTER_DIR),
                        help=f"state, logs and Ray temp dirs of the nodes (default {CLUSTER_DIR})")


def run_command(name: str, args: argparse.Namespace) -> int:
    if name == "cluster":
        return _cluster_command(args)
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


def _cluster_command(args: argparse.Namespace) -> int:
    state_dir = Path(args.dir)
    if args.action == "down":
        ended = stop_local_cluster(state_dir)
        print(f"stopped {ended} node(s)" if ended else f"no cluster recorded in {state_dir}")
        return 0
    if args.action == "status":
        path = state_dir / STATE_FILE
        if not path.is_file():
            print(f"no cluster recorded in {state_dir}")
            return 1
        state = json.loads(path.read_text())
        os.environ.setdefault("RAY_AUTH_MODE", state["auth_mode"])
        print(f"{_alive_nodes(state['dashboard'])} of {len(state['nodes'])} node(s) alive; "
              f"address {state['address']}, dashboard {state['dashboard']}")
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # this process talks to the cluster as its nodes do
    state = start_local_cluster(workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus,
                                gpus_per_node=args.gpus_per_node, object_store_mb=args.object_store_mb,
                                state_dir=state_dir)
    cpus = sum(node["cpus"] for node in state["nodes"])
    auth = ("token (~/.ray/auth_token): export RAY_AUTH_MODE=token in shells that use the cluster"
            if state["auth_mode"] == "token" else "disabled (RAY_AUTH_MODE=disabled): anyone on this host can use it")
    print(f"Ray cluster up: head + {args.workers} worker node(s), {cpus:g} CPUs, all on this machine\n"
          f"  auth:      {auth}\n"
          f"  drivers:   export RAY_ADDRESS={state['address']}   (then `lesion run` runs on this cluster)\n"
          f"  jobs:      {state['dashboard']}\n"
          f"  submit:    ray job submit --address {state['dashboard']} --working-dir . "
          f"--runtime-env cluster/runtime_env.yaml -- lesion run --run $PWD/runs/cluster\n"
          f"  stop:      lesion cluster down" + ("" if args.dir == str(CLUSTER_DIR) else f" --dir {args.dir}"))
    return 0
