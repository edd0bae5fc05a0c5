"""One capacity model for every stage: what a stage will ask Ray for, checked against what the cluster has before
anything starts, so that no command waits silently for resources that will never come.

A stage describes its request as ``Need`` rows (a group of identical actors or tasks, with the config setting that
sizes them). ``check`` compares them with a ``Cluster`` and raises ``CapacityError`` naming the resource, the amount
needed, the amount the cluster has and the setting to change; on an autoscaling cluster it only warns, since nodes may
still come. ``serve_replica_cpus`` fits serving to a small single-node cluster instead of failing. ``waiting_notice``
prints why a stage is still waiting when Ray has not scheduled it within a minute.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lesion.config import Config, TrainConfig

log = logging.getLogger(__name__)

# A Ray Data read/map task asks for one CPU (read_parquet's file listing too): training leaves one whole CPU free for
# it. Why not a fraction: docs/decisions.md, "A whole CPU for Ray Data reads".
DATA_TASK_CPU = 1.0
RESOURCES = (("CPU", "cpu"), ("GPU", "gpu"), ("memory", "memory"))


class CapacityError(RuntimeError):
    """A stage asks for more than the cluster has and no autoscaler can add it."""


@dataclass(frozen=True)
class Cluster:
    """What a Ray cluster offers: totals, the largest node (one actor must fit on one node) and whether nodes can
    still be added by an autoscaler."""

    cpu: float
    gpu: float = 0.0
    memory: float = 0.0  # bytes; 0 = unknown (not checked)
    nodes: int = 1
    node_cpu: float | None = None  # the largest node's; None = the totals
    node_gpu: float | None = None
    autoscaling: bool = False

    @classmethod
    def of_ray(cls, autoscaling: bool = False) -> Cluster:
        """The cluster the driver is connected to (``ray.init`` first)."""
        import ray

        total = ray.cluster_resources()
        alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        return cls(cpu=total.get("CPU", 0.0), gpu=total.get("GPU", 0.0), memory=total.get("memory", 0.0),
                   nodes=len(alive), node_cpu=max((r.get("CPU", 0.0) for r in alive), default=0.0),
                   node_gpu=max((r.get("GPU", 0.0) for r in alive), default=0.0), autoscaling=autoscaling)

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """A simulated cluster from JSON such as ``{"CPU": 64, "GPU": 8, "nodes": 2}`` (for planning)."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cluster resources: not JSON ({exc}): {text!r}") from exc
        if not isinstance(values, dict) or "CPU" not in values:
            raise ValueError(f'cluster resources: expected a mapping with at least "CPU", got {text!r}')
        nodes = int(values.get("nodes", 1))
        cpu, gpu = float(values["CPU"]), float(values.get("GPU", 0.0))
        return cls(cpu=cpu, gpu=gpu, memory=float(values.get("memory", 0.0)), nodes=nodes,
                   node_cpu=cpu / nodes, node_gpu=gpu / nodes, autoscaling=bool(values.get("autoscaling", False)))

    def total(self, resource: str) -> float:
        return getattr(self, resource)

    def largest_node(self, resource: str) -> float | None:
        return {"cpu": self.node_cpu, "gpu": self.node_gpu}.get(resource)


@dataclass(frozen=True)
class Need:
    """A group of ``count`` identical actors or tasks that a stage asks Ray for at the same time."""

    what: str  # e.g. "train efficientnet_lite0: DDP workers"
    count: int
    cpu: float
    gpu: float = 0.0
    memory: float = 0.0  # bytes per actor
    setting: str = ""  # the config field(s) that size it, named in the error

    def total(self, resource: str) -> float:
        return self.count * getattr(self, resource)


def _amount(value: float, resource: str) -> str:
    return f"{value / 2**30:.1f} GiB" if resource == "memory" else f"{value:g}"


def shortfalls(needs: list[Need], cluster: Cluster) -> list[str]:
    """Each way ``needs``, all running at once, do not fit ``cluster``: one sentence per resource and actor size."""
    problems = []
    for name, resource in RESOURCES:
        have = cluster.total(resource)
        if resource == "memory" and not have:
            continue
        wanted = sum(need.total(resource) for need in needs)
        if wanted > have + 1e-9:
            parts = ", ".join(f"{need.what} {need.count} x {_amount(getattr(need, resource), resource)}"
                              for need in needs if need.total(resource) > 0)
            settings = " or ".join(dict.fromkeys(n.setting for n in needs if n.total(resource) > 0 and n.setting))
            problems.append(f"{name}: needs {_amount(wanted, resource)} ({parts}), the cluster has "
                            f"{_amount(have, resource)}" + (f"; lower {settings}" if settings else ""))
        biggest = cluster.largest_node(resource)
        for need in needs:
            if biggest is not None and cluster.nodes > 1 and getattr(need, resource) > biggest + 1e-9:
                problems.append(f"{name}: one actor of {need.what} needs {getattr(need, resource):g}, the largest "
                                f"node has {biggest:g}" + (f"; lower {need.setting}" if need.setting else ""))
    return problems


def check(stage: str, needs: list[Need], cluster: Cluster) -> None:
    """Raise ``CapacityError`` when ``needs`` cannot run on ``cluster``; on an autoscaling cluster, warn instead."""
    problems = shortfalls(needs, cluster)
    if not problems:
        return
    if cluster.autoscaling:
        for problem in problems:
            log.warning("%s: the cluster is short now, waiting for the autoscaler: %s", stage, problem)
        return
    raise CapacityError(f"{stage} cannot start on this cluster: " + "; ".join(problems))


def train_needs(name: str, cfg: TrainConfig) -> list[Need]:
    """One training of model ``name``: its DDP workers and the Ray Data task that feeds them."""
    return [Need(f"train {name}: DDP workers", cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
                 setting="train.workers / train.cpus_per_worker / train.gpus_per_worker"),
            Need("Ray Data reading", 1, DATA_TASK_CPU, setting="train.cpus_per_worker")]


def tune_needs(config: Config, concurrent: int) -> list[Need]:
    """``concurrent`` tuning trials of ``config.tune``, each with its workers."""
    tcfg = config.tune
    per_trial_cpu = tcfg.cpus_per_trial * tcfg.workers_per_trial
    per_trial_gpu = tcfg.gpus_per_trial * tcfg.workers_per_trial
    return [Need("tune trials", concurrent, per_trial_cpu, per_trial_gpu,
                 setting="tune.cpus_per_trial / tune.gpus_per_trial / tune.max_concurrent")]


def tune_concurrency(config: Config, cluster: Cluster) -> int:
    """How many trials run at once: ``tune.max_concurrent`` if set, else as many as the cluster holds (at least 1)."""
    tcfg = config.tune
    if tcfg.max_concurrent:
        return min(tcfg.max_concurrent, tcfg.trials)
    per_cpu = tcfg.cpus_per_trial * tcfg.workers_per_trial + (0.1 if tcfg.workers_per_trial > 1 else 0.0)
    limits = [int(cluster.cpu // per_cpu + 1e-9) if per_cpu > 0 else tcfg.trials]
    if tcfg.gpus_per_trial > 0:
        limits.append(int(cluster.gpu // (tcfg.gpus_per_trial * tcfg.workers_per_trial) + 1e-9))
    return max(1, min(limits + [tcfg.trials]))


def evaluate_needs(config: Config) -> list[Need]:
    """Batch inference: the evaluation actors and the Ray Data task that reads the shards."""
    ev = config.evaluate
    return [Need("evaluation actors", ev.actors, ev.cpus_per_actor, ev.gpus_per_actor,
                 setting="evaluate.actors / evaluate.cpus_per_actor / evaluate.gpus_per_actor"),
            Need("Ray Data reading", 1, DATA_TASK_CPU, setting="evaluate.cpus_per_actor")]


def serve_needs(config: Config, models: int, cpus_per_replica: float) -> list[Need]:
    """The Serve application: one deployment per model, the Grad-CAM deployment (it loads every model, so it asks
    for a GPU share too) and the HTTP ingress (which also combines the ensemble), each at ``serve.min_replicas``."""
    sv = config.serve
    setting = "serve.cpus_per_replica / serve.min_replicas"
    return [Need("model replicas", models * sv.min_replicas, cpus_per_replica, sv.gpus_per_replica,
                 setting=setting + " / serve.gpus_per_replica / --models"),
            Need("Grad-CAM replicas", sv.min_replicas, cpus_per_replica, sv.gpus_per_replica,
                 setting=setting + " / serve.gpus_per_replica"),
            Need("ingress replicas", sv.min_replicas, cpus_per_replica, setting=setting)]


def serve_replica_cpus(config: Config, models: int, cluster: Cluster) -> tuple[float, str | None]:
    """The CPU share each replica asks for, and a one-line note when it had to shrink to fit.

    On a single node that no autoscaler grows, a configured share that does not fit is lowered so that every replica
    starts (replicas then share the cores, as processes on one machine do anyway); elsewhere it is kept and ``check``
    decides. Shares are rounded down to 0.01 CPU.
    """
    share = config.serve.cpus_per_replica
    replicas = sum(need.count for need in serve_needs(config, models, share))
    wanted = replicas * share
    if wanted <= cluster.cpu + 1e-9 or cluster.autoscaling or cluster.nodes > 1 or share == 0:
        return share, None
    fitted = math.floor(cluster.cpu / replicas * 100) / 100
    if fitted <= 0:
        return share, None  # not even 0.01 each: let check() say so
    note = (f"serve: {replicas} replicas x {share:g} CPU need {wanted:g} CPU, this single-node cluster has "
            f"{cluster.cpu:g}: each replica asks for {fitted:g} CPU instead (set serve.cpus_per_replica to choose)")
    return fitted, note


def check_disk(path: str | Path, needed_bytes: float, what: str, setting: str = "") -> None:
    """Raise ``CapacityError`` when the filesystem holding ``path`` (local paths only) has less free space than
    ``needed_bytes``."""
    if "://" in str(path):
        return
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise CapacityError(f"{what}: needs about {needed_bytes / 2**30:.2f} GiB of disk under {path}, "
                            f"{free / 2**30:.2f} GiB is free" + (f"; lower {setting}" if setting else ""))


@contextmanager
def waiting_notice(stage: str, after_s: float = 60.0, every_s: float = 60.0) -> Iterator[None]:
    """While the body runs, check once ``after_s`` has passed and every ``every_s`` after whether Ray holds actors or
    placement groups that wait for resources; if so, print which and what is free. Ends with the body."""
    done = threading.Event()

    def watch() -> None:
        waited, pause = 0.0, after_s
        while not done.wait(pause):
            waited += pause
            pause = every_s
            pending = _pending()
            if pending:
                log.warning("%s: waiting for resources after %.0f s: %s; free now: %s", stage, waited, pending,
                            _free_resources())

    thread = threading.Thread(target=watch, name=f"waiting-notice-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)


def _pending() -> str:
    """Resource demands Ray has not scheduled yet (tasks, actors, placement groups), as the GCS reports them to the
    autoscaler ('' when none)."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    except Exception as exc:  # the notice must never break the stage it watches
        log.debug("could not read the cluster's pending demands: %s", exc)
        return ""
    parts = [f"{r.count} x {r.bundle} for tasks/actors" for d in demands.ray_task_actor_demand
             for r in d.bundles_by_count]
    parts += [f"placement group {[f'{r.count} x {r.bundle}' for r in d.bundles_by_count]}"
              for d in demands.placement_group_demand]
    return "; ".join(parts)


def _free_resources() -> str:
    import ray

    free = ray.available_resources()
    return ", ".join(f"{free.get(key, 0.0):g} {key}" for key in ("CPU", "GPU"))
