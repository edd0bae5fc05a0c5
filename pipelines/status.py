"""The stage table of ``lesion run`` (one row per node of the workflow's graph) and ``lesion status``.

The table prints one line per change, keeps ``RUN/status.json`` current (so ``lesion status --run RUN`` shows a run
in progress or done from its directory alone) and prints in full at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lesion.rundir import RunDir

STATUS_FILE = "status.json"  # in the run directory
ENDED = ("done", "current", "skipped", "failed", "blocked")


@dataclasses.dataclass
class StageRow:
    """One node of the run: its status, time, a note, what it asks Ray for, its log."""

    name: str
    status: str = "pending"
    seconds: float | None = None
    note: str = ""
    resources: str = ""
    started_at: float | None = None  # wall clock when it began (None for a node that never ran)
    log: str | None = None


def _line(row: StageRow, now: float | None = None) -> str:
    seconds = row.seconds
    if seconds is None and row.status == "running" and row.started_at is not None:
        seconds = (now or time.time()) - row.started_at
    shown = "-" if seconds is None else f"{seconds:.1f}s"
    return f"  {row.name:<24} {row.status:<10} {shown:>8}  {row.note}"


def render(title: str, rows: list[StageRow], total_seconds: float, now: float | None = None) -> str:
    """The table: a title, one line per node, the total time."""
    lines = [title, f"  {'stage':<24} {'status':<10} {'time':>8}  note"]
    lines += [_line(row, now) for row in rows]
    lines.append(f"  {'total':<24} {'':<10} {total_seconds:>7.1f}s")
    return "\n".join(lines)


class StageTable:
    """The progress view of ``lesion run``: rows change from several node threads; each change prints one line and
    rewrites ``path`` (``RUN/status.json``) when given."""

    def __init__(self, title: str, out=None, path: Path | None = None):
        self.title = title
        self.rows: dict[str, StageRow] = {}
        self.out = out or sys.stdout
        self.path = path
        self.state = "running"
        self.started = time.perf_counter()
        self.started_at = time.time()
        self.lock = threading.Lock()

    def add(self, name: str, resources: str = "") -> None:
        """A pending row (a node that has not started)."""
        with self.lock:
            self.rows[name] = StageRow(name, resources=resources)
            self._save()

    def note(self, text: str) -> None:
        """A line under the table (a warning, a hint)."""
        print(f"  {text}", file=self.out, flush=True)

    def begin(self, name: str, log: str | None = None) -> None:
        with self.lock:
            row = self.rows.setdefault(name, StageRow(name))
            row.status, row.started_at, row.log = "running", time.time(), log
            self._print(row)

    def end(self, name: str, status: str, seconds: float | None, note: str = "") -> None:
        with self.lock:
            row = self.rows.setdefault(name, StageRow(name))
            row.status, row.seconds, row.note = status, seconds, note
            self._print(row)

    def heartbeat(self) -> None:
        """One line naming the running nodes and how long each has run (a long stage is never silent)."""
        with self.lock:
            running = [row for row in self.rows.values() if row.status == "running"]
            if running:
                now = time.time()
                parts = ", ".join(f"{row.name} {now - row.started_at:.0f}s" for row in running)
                print(f"  ... still running: {parts}", file=self.out, flush=True)

    def finish(self, state: str) -> None:
        """The run ended (``done`` or ``failed``)."""
        with self.lock:
            self.state = state
            self._save()

    def summary(self) -> str:
        with self.lock:
            return render(self.title, list(self.rows.values()), time.perf_counter() - self.started)

    def _print(self, row: StageRow) -> None:
        print(_line(row), file=self.out, flush=True)
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        document = {"title": self.title, "state": self.state, "started_at": self.started_at,
                    "updated_at": time.time(), "rows": [dataclasses.asdict(row) for row in self.rows.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(document, indent=2) + "\n")
        partial.replace(self.path)  # a reader never sees half a file


def read_status(run: RunDir) -> dict[str, Any]:
    """``RUN/status.json`` as written by ``StageTable`` (read straight from the storage of a remote run)."""
    path = f"{run.uri}/{STATUS_FILE}"
    try:
        if run.is_remote:
            from pyarrow import fs as pafs

            filesystem, where = pafs.FileSystem.from_uri(path)
            with filesystem.open_input_stream(where) as stream:
                text = stream.read().decode()
        else:
            text = (run.root / STATUS_FILE).read_text()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} not found: `lesion run --run {run.uri}` writes it") from exc
    try:
        document = json.loads(text)
        rows = [StageRow(**row) for row in document["rows"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a stage table written by `lesion run` ({exc})") from exc
    return {**document, "rows": rows}


def status_text(document: dict[str, Any]) -> str:
    """The stage table of a run in progress or done, with its state (``document``: ``read_status``)."""
    rows = document["rows"]
    end = document["updated_at"] if document["state"] != "running" else time.time()
    text = render(document["title"], rows, end - document["started_at"])
    lines = [text, f"  state: {document['state']}"]
    lines += [f"  {row.name} failed; log: {row.log}" for row in rows if row.status == "failed" and row.log]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command line


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Flags of ``lesion status``."""
    parser.add_argument("--run", required=True, help="run directory of a `lesion run` in progress or done")


def run_command(name: str, args: argparse.Namespace) -> int:
    """``lesion status``: print the run's stage table; exit 1 when a node failed."""
    document = read_status(RunDir(args.run))
    print(status_text(document))
    return 1 if document["state"] == "failed" else 0
