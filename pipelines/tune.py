"""``lesion tune``: search the custom CNN's hyperparameters with Ray Tune, OptunaSearch (seeded TPE) and ASHA.

Every trial runs the training loop of ``lesion train`` (``pipelines.loop.run_training``), reporting each epoch to
Tune so ASHA can stop poor trials early. A one-worker trial is a Tune function with its own CPU/GPU share (fractional
GPUs work) that reads the ingested split from the object store (put there once for all trials: no Ray Data tasks
inside the trial, so concurrent trials cannot starve a data read of CPUs). With ``workers_per_trial > 1`` a trial is
a small driver that runs a multi-worker TorchTrainer on the shards and forwards its reports to Tune.

Writes ``RUN/tune/``: ``trials.csv`` (every trial: parameters, status, epochs, metrics), ``best.yaml`` (a config
file setting ``train.models.<model>``; ``lesion train --from-tune`` applies it), ``summary.json`` (sampler and seed,
scheduler, counts, timing), ``history.png`` (optimisation history), ``importance.png`` (parameter importances) and
``ray/search/`` (Tune's experiment state, for ``--resume``). The manifest's ``tune`` entry carries
``tune_fingerprint``: the search's inputs and ``TUNE_VERSION``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.train
import yaml
from ray import tune

from lesion.config import Config, ConfigError, TrainConfig, apply_overrides
from lesion.data.shards import load_split, read_info
from lesion.records import DataRecord
from lesion.rundir import RunDir, changed_settings, atomic_path, fingerprint, remove_tree, write_atomic
from lesion.vocabulary import SEARCH_SPACE_TYPES, TUNE_MODES, TUNE_SCHEDULERS
from pipelines import capacity
from pipelines.common import init_ray, resolve_config
from pipelines.datasets import training_datasets
from pipelines.loop import TuneSession, build_trainer, loop_spec, quiet_ray_progress, read_state, run_training, verbose
from pipelines.train import required_weights
from pipelines.tuned import BEST_FILE

log = logging.getLogger(__name__)

TUNE_VERSION = 1  # bump when a change makes the search write different results (re-tunes every run)
EXPERIMENT = "search"  # RUN/tune/ray/<EXPERIMENT>/: Tune's experiment state


def tune_fingerprint(config: Config, data: DataRecord) -> str:
    """What a search depends on: ``TUNE_VERSION``, the tune section, the untuned training config of the tuned model
    and the data's fingerprint (``data``: the run's ``data/info.json``)."""
    untuned = changed_settings(config.model_config(config.tune.model))
    untuned.pop("models", None)
    return fingerprint("tune", TUNE_VERSION, changed_settings(config.tune), untuned, data.fingerprint)


# --------------------------------------------------------------------------------------------- search space


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def param_space(spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune domains from the YAML search space: {field: {type: loguniform|uniform|int|choice, low, high | values}}.

    Fields must be ``train`` fields. Choices that are lists (e.g. conv widths) are offered to Optuna as their JSON
    text and decoded by ``decode_params``.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"models"}
    space = {}
    for key, entry in spec.items():
        where = f"tune.search_space.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: not a train field; known: {', '.join(sorted(fields))}")
        if not isinstance(entry, dict) or entry.get("type") not in SEARCH_SPACE_TYPES:
            raise ConfigError(f"{where}: expected a mapping with type one of {', '.join(SEARCH_SPACE_TYPES)}, "
                              f"got {entry!r}")
        kind = entry["type"]
        try:
            if kind == "choice":
                values = list(entry["values"])
                if not values:
                    raise ConfigError(f"{where}: choice needs at least one value")
                space[key] = tune.choice([v if _is_scalar(v) else json.dumps(v) for v in values])
            elif kind == "int":
                space[key] = tune.randint(int(entry["low"]), int(entry["high"]) + 1)
            else:
                low, high = float(entry["low"]), float(entry["high"])
                if not low < high or (kind == "loguniform" and low <= 0):
                    raise ConfigError(f"{where}: need 0 < low < high (loguniform) or low < high, got {low}, {high}")
                space[key] = (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high)
        except KeyError as exc:
            raise ConfigError(f"{where}: {kind} needs {exc.args[0]!r}") from exc
    return space


def decode_params(params: dict[str, Any], spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Trial parameters back to config values (JSON-encoded list choices decoded)."""
    decoded = {}
    for key, value in params.items():
        entry = spec.get(key, {})
        if entry.get("type") == "choice" and isinstance(value, str) and not all(_is_scalar(v) for v in entry["values"]):
            value = json.loads(value)
        decoded[key] = value
    return decoded


def trial_config(config: Config, name: str, params: dict[str, Any], epochs: int) -> TrainConfig:
    """The resolved training config of one trial: the model's config with the trial's parameters and epochs."""
    overrides = {f"train.models.{name}.{key}": value for key, value in params.items()}
    overrides[f"train.models.{name}.epochs"] = epochs
    return apply_overrides(config, overrides).model_config(name)


# --------------------------------------------------------------------------------------------- trials


def trial_single(params: dict[str, Any], *, config: Config, name: str, data_record: DataRecord,
                 data: dict[str, np.ndarray]) -> None:
    """One trial on one worker: the training loop of ``lesion train`` on the split arrays."""
    spec = config.tune.search_space
    cfg = trial_config(config, name, decode_params(params, spec), config.tune.epochs)
    loop = loop_spec(cfg, name, data_record, progress=False)  # Tune's trial table reports progress
    run_training(loop, TuneSession(loop, data))


def trial_distributed(params: dict[str, Any], *, config: Config, name: str, data_record: DataRecord,
                      run_root: str) -> None:
    """One trial as a multi-worker TorchTrainer on the shards; its reports reach Tune through TuneReportCallback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    tcfg = config.tune
    cfg = trial_config(config, name, decode_params(params, tcfg.search_space), tcfg.epochs)
    # max_failures 0: a trial that raises or loses a worker is recorded as failed, as a one-worker trial is (Tune's
    # own FailureConfig retries no trial), so a deterministic error costs one attempt, not one per allowed retry
    cfg = dataclasses.replace(cfg, workers=tcfg.workers_per_trial, cpus_per_worker=tcfg.cpus_per_trial /
                              tcfg.workers_per_trial, gpus_per_worker=tcfg.gpus_per_trial / tcfg.workers_per_trial,
                              max_failures=0)
    run = RunDir(run_root)
    context = tune.get_context()
    storage = f"{run.uri}/tune/trials" if run.is_remote else str(run.tune / "trials")
    # Inside a trial Ray Data gets no CPU budget for streaming reads beside the train workers (the reads would
    # wait forever), so the trial reads the training split once, before its workers start.
    datasets = training_datasets(run, cfg, materialize_train=True)
    trainer = build_trainer(cfg, loop_spec(cfg, name, data_record, progress=False), datasets, storage,
                            context.get_trial_id(), callbacks=[TuneReportCallback()])
    trainer.fit()


def _trainable(config: Config, run: RunDir, name: str, data_record: DataRecord):
    """The trial function with its resources (and, for one-worker trials, the split arrays)."""
    tcfg = config.tune
    if tcfg.workers_per_trial > 1:
        fn = tune.with_parameters(trial_distributed, config=config, name=name, data_record=data_record,
                                  run_root=run.uri)
        return tune.with_resources(fn, {"cpu": 0.1})
    train, val = load_split(run.root, "train"), load_split(run.root, "val")
    data = {"train_images": train.images, "train_labels": train.labels, "val_images": val.images,
            "val_labels": val.labels}
    fn = tune.with_parameters(trial_single, config=config, name=name, data_record=data_record, data=data)
    return tune.with_resources(fn, {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial})


# --------------------------------------------------------------------------------------------- the search


def tune_model(config: Config, run: RunDir, *, resume: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or ``resume``) the search of ``config.tune`` on the run's ingested data; write ``RUN/tune/``.

    Trials that raise or lose their worker are recorded as failed and the search goes on. ``callbacks`` are extra
    Tune callbacks. Returns the summary also written to ``summary.json``.
    """
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tcfg = config.tune
    name = tcfg.model
    space = param_space(tcfg.search_space)
    if tcfg.scheduler not in TUNE_SCHEDULERS:
        raise ConfigError(f"tune.scheduler: expected one of {', '.join(TUNE_SCHEDULERS)}, got {tcfg.scheduler!r}")
    if tcfg.mode not in TUNE_MODES:
        raise ConfigError(f"tune.mode: expected one of {', '.join(TUNE_MODES)}, got {tcfg.mode!r}")
    data_record = read_info(run.root)
    init_ray()
    cluster = capacity.Cluster.of_ray(autoscaling=config.workflow.autoscaling)
    concurrency = capacity.tune_concurrency(config, cluster)
    capacity.check(f"tune {name}", capacity.tune_needs(config, concurrency), cluster)  # before any trial starts
    required_weights(config, [name])  # a missing weights file fails here once, not in every trial
    quiet_ray_progress()
    storage = f"{run.uri}/tune/ray" if run.is_remote else str(run.tune / "ray")
    experiment = f"{storage}/{EXPERIMENT}"
    trainable = _trainable(config, run, name, data_record)
    started = time.perf_counter()
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise FileNotFoundError(f"no search to resume under {experiment}: run `lesion tune` without --resume")
        log.info("resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False)
    else:
        remove_tree(experiment)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=tcfg.epochs, grace_period=tcfg.grace_period,
                                   reduction_factor=tcfg.reduction_factor)
                     if tcfg.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=tcfg.metric, mode=tcfg.mode, num_samples=tcfg.trials, max_concurrent_trials=concurrency,
                search_alg=OptunaSearch(sampler=TPESampler(seed=tcfg.seed)), scheduler=scheduler),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=storage, callbacks=callbacks, verbose=2 if verbose() else 1,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
        log.info("searching %d trials of %s (%d at a time), metric %s (%s)", tcfg.trials, name, concurrency,
                 tcfg.metric, tcfg.mode)
    with capacity.waiting_notice(f"tune {name}"):
        results = tuner.fit()
    return write_results(config, run, results, time.perf_counter() - started)


def _trial_row(result, trial, spec: dict[str, Any], metric: str, mode: str, epochs: int) -> dict[str, Any]:
    """One line of trials.csv: parameters, status, epochs run, the best value of ``metric``, last val metrics.

    ``status``: failed (raised, or lost its worker), completed (all epochs, or stopped by the loop's early
    stopping), stopped_early (by the scheduler), unfinished (an interrupted search; ``--resume`` continues it).
    """
    params = {k: result.config[k] for k in spec if k in result.config}
    last = result.metrics or {}
    # one-worker trials report Tune checkpoints; multi-worker ones report their Train checkpoint's path
    checkpoint = result.checkpoint
    if checkpoint is None and last.get("checkpoint_path"):
        checkpoint = ray.train.Checkpoint(last["checkpoint_path"])
    history = read_state(checkpoint)["history"] if checkpoint is not None else []
    values = [row[metric] for row in history if metric in row and not math.isnan(row[metric])]
    best = (min(values) if mode == "min" else max(values)) if values else math.nan
    if trial.status == "ERROR" or result.error is not None:
        outcome = "failed"
    elif trial.status != "TERMINATED":
        outcome = "unfinished"
    elif len(history) >= epochs or last.get("early_stop"):
        outcome = "completed"
    else:
        outcome = "stopped_early"
    error = "" if result.error is None else str(result.error).strip().splitlines()[-1][:300]
    return {"trial_id": trial.trial_id, "status": outcome, "epochs": len(history),
            **params, f"best_{metric}": best, **{f"last_{k}": v for k, v in last.items() if k.startswith("val_")},
            "error": error}


def write_results(config: Config, run: RunDir, results, seconds: float) -> dict[str, Any]:
    """trials.csv, best.yaml, summary.json and the plots from a ResultGrid."""
    tcfg = config.tune
    spec = tcfg.search_space
    trials = {trial.path: trial for trial in tune.ExperimentAnalysis(results.experiment_path,
                                                                    storage_filesystem=results.filesystem).trials}
    rows = [_trial_row(r, trials[r.path], spec, tcfg.metric, tcfg.mode, tcfg.epochs) for r in results]
    table = pd.DataFrame(rows)
    run.tune.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.tune / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    score = f"best_{tcfg.metric}"
    scored = table[table["status"] != "failed"].dropna(subset=[score]) if len(table) else table
    best_row = None
    if len(scored):
        best_row = scored.sort_values(score, ascending=tcfg.mode == "min").iloc[0].to_dict()
        params = decode_params({k: _plain(best_row[k]) for k in spec}, spec)
        header = (f"# Best configuration found by `lesion tune` for {tcfg.model}: trial {best_row['trial_id']}, "
                  f"{tcfg.metric} = {best_row[score]:.4f}\n# Apply with `lesion train --from-tune` "
                  f"(or --config this file).\n")
        write_atomic(run.tune / BEST_FILE, header + yaml.safe_dump({"train": {"models": {tcfg.model: params}}},
                                                                     sort_keys=False))
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    summary = {
        "model": tcfg.model, "metric": tcfg.metric, "mode": tcfg.mode, "trials": tcfg.trials,
        "trials_finished": len(table), "status_counts": counts,
        "complete": len(table) == tcfg.trials, "sampler": "optuna.samplers.TPESampler", "sampler_seed": tcfg.seed,
        "scheduler": {"name": tcfg.scheduler, "grace_period": tcfg.grace_period,
                      "reduction_factor": tcfg.reduction_factor, "max_t": tcfg.epochs},
        "resources_per_trial": {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial,
                                "workers": tcfg.workers_per_trial},
        "epochs": tcfg.epochs, "seconds": seconds,
        "trials_per_minute": len(table) / (seconds / 60) if seconds > 0 else 0.0,
        "best_trial": best_row and best_row["trial_id"], "best_value": best_row and float(best_row[score]),
        "best_params": best_row and decode_params({k: _plain(best_row[k]) for k in spec}, spec),
    }
    write_atomic(run.tune / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    plot_history(table, tcfg.metric, tcfg.mode, run.tune / "history.png")
    plot_importance(table, spec, tcfg.metric, tcfg.mode, run.tune / "importance.png")
    run.record("tune", config=config.to_dict()["tune"], fingerprint=tune_fingerprint(config, read_info(run.root)),
               best_trial=summary["best_trial"], best_value=summary["best_value"], complete=summary["complete"])
    return summary


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def plot_history(table: pd.DataFrame, metric: str, mode: str, path: Path) -> Path:
    """Optimisation history: each trial's best value in trial order, and the best so far."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    score = f"best_{metric}"
    if len(table):
        values = table[score].to_numpy(dtype=float)
        order = np.arange(len(table))
        for status, marker in (("completed", "o"), ("stopped_early", "v"), ("unfinished", "s")):
            mask = (table["status"] == status).to_numpy() & np.isfinite(values)
            ax.scatter(order[mask], values[mask], marker=marker, label=status)
        finite = np.where(np.isfinite(values), values, np.inf if mode == "min" else -np.inf)
        running = np.minimum.accumulate(finite) if mode == "min" else np.maximum.accumulate(finite)
        ax.step(order, np.where(np.isfinite(running), running, np.nan), where="post", color="k", label="best so far")
        failed = order[(table["status"] == "failed").to_numpy()]
        for x in failed:
            ax.axvline(x, color="red", alpha=0.3, label="failed" if x == failed[0] else None)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (best epoch)")
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _distribution(entry: dict[str, Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind = entry["type"]
    if kind == "choice":
        return CategoricalDistribution([v if _is_scalar(v) else json.dumps(v) for v in entry["values"]])
    if kind == "int":
        return IntDistribution(int(entry["low"]), int(entry["high"]))
    return FloatDistribution(float(entry["low"]), float(entry["high"]), log=kind == "loguniform")


def parameter_importances(table: pd.DataFrame, spec: dict[str, Any], metric: str, mode: str) -> dict[str, float]:
    """Optuna's (fANOVA) parameter importances on a study rebuilt from the scored trials ({} when fewer than 2, or
    when every trial scored the same: importance is then undefined)."""
    import optuna

    score = f"best_{metric}"
    scored = table[table["status"] != "failed"].dropna(subset=[score]) if len(table) else table
    varied = [k for k in spec if k in scored and scored[k].nunique() > 1]
    if len(scored) < 2 or not varied or scored[score].nunique() < 2:
        return {}
    distributions = {k: _distribution(spec[k]) for k in varied}
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _, row in scored.iterrows():
        params = {k: int(row[k]) if spec[k]["type"] == "int" else _plain(row[k]) for k in varied}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[score])))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}


def plot_importance(table: pd.DataFrame, spec: dict[str, Any], metric: str, mode: str, path: Path) -> Path:
    """Bar chart of parameter importances for ``metric``."""
    from matplotlib.figure import Figure

    importances = parameter_importances(table, spec, metric, mode)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel(f"importance for {metric} (fANOVA)")
    else:
        ax.text(0.5, 0.5, "needs at least 2 scored trials with varied parameters and scores", ha="center",
                va="center")
        ax.set_axis_off()
    ax.set_title("parameter importances")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(name: str, parser) -> None:
    """Flags of ``lesion tune``."""
    parser.add_argument("--run", required=True, help="run directory (ingested with `lesion ingest`)")
    parser.add_argument("--config", help="YAML config (default: RUN/config.yaml, else the built-in defaults)")
    parser.add_argument("--model", help="model to tune (tune.model; the search space is tune.search_space)")
    parser.add_argument("--trials", type=int, help="number of trials")
    parser.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPU share per trial (e.g. 0.25)")
    parser.add_argument("--cpus-per-trial", type=float)
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what the resources allow)")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted search, keeping finished trials")


def run_command(name: str, args) -> int:
    """``lesion tune``: run the search, print the best trial."""
    run = RunDir(args.run)
    overrides = {"tune.model": args.model, "tune.trials": args.trials, "tune.epochs": args.epochs,
                 "tune.gpus_per_trial": args.gpus_per_trial, "tune.cpus_per_trial": args.cpus_per_trial,
                 "tune.max_concurrent": args.max_concurrent}
    config = resolve_config(run, args.config, overrides, save=args.save_config)
    summary = tune_model(config, run, resume=args.resume)
    print(f"trials: {summary['trials_finished']}/{summary['trials']} {summary['status_counts']}  "
          f"({summary['trials_per_minute']:.2f} trials/minute)")
    if summary["best_trial"]:
        print(f"best trial {summary['best_trial']}: {summary['metric']} = {summary['best_value']:.4f}")
        for key, value in summary["best_params"].items():
            print(f"  {key}: {value}")
        print(f"best config: {run.tune / BEST_FILE} (apply with `lesion train --run {run.root} --from-tune`)")
    return 0
