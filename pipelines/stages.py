"""The stages of the workflow behind one protocol, ``Stage``: a name, the stages it reads from (``inputs``), what it
asks Ray for (``needs``), its manifest entry and files (``artefact``, ``artefacts``), the fingerprint of its inputs,
whether it is current, how to run it, and a one-line summary of its result.

Whether a stage is current is decided here and nowhere else (``Stage.made_from``): every file of its artefact is
in the run directory and the manifest's entry for it carries the fingerprint its inputs have now. ``lesion run``
(``pipelines.workflow``) builds its graph and ``--plan`` from stages and asks each before running it; ``lesion
ingest`` and ``lesion evaluate`` skip current work through their stage; ``lesion train`` and ``lesion tune`` always
make their artefact (asked for by name, they are never skipped). Adding a stage is adding one subclass: ``Train``
and ``Tune`` are here; ``Ingest`` and ``Evaluate`` sit beside the code they run (``pipelines.ingest``,
``pipelines.evaluate``), which asks them without an import cycle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from lesion.config import Config
from lesion.rundir import RunDir
from pipelines import capacity


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of the workflow. A subclass sets ``kind`` and defines ``artefact``, ``artefacts``,
    ``fingerprint``, ``run`` and ``summary``."""

    inputs: tuple[str, ...] = ()  # names of the stages whose artefacts it reads
    needs: tuple[capacity.Need, ...] = ()  # what it asks Ray for while it runs
    kind: ClassVar[str] = ""
    exclusive: ClassVar[bool] = False  # runs alone (Ray Data spreads over every CPU)
    current_status: ClassVar[str] = "skipped"  # its row in the stage table when it is current

    @property
    def name(self) -> str:
        """The stage's name in the graph, the stage table and its log file."""
        return self.kind

    def artefact(self, run: RunDir) -> str:
        """Its entry in the run's manifest."""
        return self.kind

    def artefacts(self, run: RunDir) -> list[Path]:
        """The files that must be in the run directory for it to be current."""
        raise NotImplementedError

    def fingerprint(self, config: Config, run: RunDir) -> str:
        """The fingerprint of its inputs now (its version constant, config section and the artefacts it reads)."""
        raise NotImplementedError

    def is_current(self, config: Config, run: RunDir) -> bool:
        """Whether its artefact is made from the inputs it has now."""
        return self.made_from(run, self.fingerprint(config, run))

    def made_from(self, run: RunDir, fingerprint: str) -> bool:
        """Whether every file of its artefact is in ``run`` and the manifest records it made with ``fingerprint``:
        the one rule of staleness of every stage (for a caller that computed the fingerprint already)."""
        return all(path.is_file() for path in self.artefacts(run)) and run.is_current(self.artefact(run), fingerprint)

    def run(self, config: Config, run: RunDir) -> Any:
        """Make its artefact; returns its result (what ``summary`` reads)."""
        raise NotImplementedError

    def summary(self, result: Any) -> str:
        """One line about its result, for the stage table."""
        raise NotImplementedError

    def configure(self, config: Config, run: RunDir) -> Config:
        """The config of the stages after it, once it is current or made (unchanged unless a stage says otherwise)."""
        return config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tune(Stage):
    """Tuning the architecture ``tune.model`` (``pipelines.tune``): ``RUN/tune/best.yaml``."""

    model: str
    kind = "tune"

    @property
    def name(self) -> str:
        return f"tune {self.model}"

    def artefacts(self, run: RunDir) -> list[Path]:
        from pipelines.tuned import BEST_FILE

        return [run.tune / BEST_FILE]

    def fingerprint(self, config: Config, run: RunDir) -> str:
        from lesion.data.shards import read_info
        from pipelines.tune import tune_fingerprint

        return tune_fingerprint(config, read_info(run.root))

    def run(self, config: Config, run: RunDir) -> dict[str, Any]:
        from pipelines.tune import tune_model

        return tune_model(config, run)

    def summary(self, result: dict[str, Any]) -> str:
        best = result.get("best_value")
        shown = "-" if best is None else f"{best:.3f}"
        return f"{result['trials_finished']} trials, best {result['metric']} {shown}"

    def configure(self, config: Config, run: RunDir) -> Config:
        """``config`` with ``RUN/tune/best.yaml`` applied to every variant of the tuned architecture."""
        from pipelines.tuned import apply_best

        return apply_best(config, run)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train(Stage):
    """Training one ``train.models`` variant (``pipelines.train``): ``RUN/models/<variant>/``."""

    variant: str
    kind = "train"

    @property
    def name(self) -> str:
        return f"train {self.variant}"

    def artefact(self, run: RunDir) -> str:
        return f"models/{self.variant}"

    def artefacts(self, run: RunDir) -> list[Path]:
        return [run.model_dir(self.variant) / "best.pt"]

    def fingerprint(self, config: Config, run: RunDir) -> str:
        from lesion.data.shards import read_info
        from pipelines.train import train_fingerprint

        return train_fingerprint(config.model_config(self.variant), read_info(run.root))

    def run(self, config: Config, run: RunDir) -> dict[str, Any]:
        from pipelines.train import train_model

        return train_model(config, run, self.variant)

    def summary(self, result: dict[str, Any]) -> str:
        return (f"best epoch {result['best_epoch'] + 1}/{result['epochs']}, val bal.acc "
                f"{result['val_balanced_accuracy']:.3f}, {result['pretrained']}")
