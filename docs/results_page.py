"""The results page: every ``benchmarks/results/*.json`` rendered as tables and plots (used by ``docs/gen.py``).

A result file is recognised by its shape, not its name, so a new benchmark's JSON appears without a change here:
a study (``models`` with bootstrap intervals), a paired comparison (rows with differences and their intervals), a
shift table (rows per ``shift``), a comparison against a peer (rows with a ``ratio``), or anything else (its
top-level figures). Every section names the command that made it and the machine it ran on, as the JSON records them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("rows", "results", "runs")  # where a result keeps its table


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; ``|`` and newlines inside cells are escaped."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def code(text: Any) -> str:
    """Inline code that survives backticks inside it."""
    text = str(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def rows_of(result: dict) -> list[dict]:
    """The result's table rows, whichever key holds them."""
    for key in ROW_KEYS:
        if isinstance(result.get(key), list) and result[key] and isinstance(result[key][0], dict):
            return result[key]
    return []


def is_interval(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)


def fmt(value: Any) -> str:
    """A cell: an interval as ``estimate [low, high]``, a float to 3 decimals, None as a dash."""
    if value is None:
        return "-"
    if is_interval(value):
        return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) >= 10 else f"{value:.3f}"
    if isinstance(value, (list, dict)):
        return code(value)
    return str(value)


def machine(result: dict) -> str:
    """The machine as the result records it: CPU model, cores, GPU."""
    device = result.get("device") or result.get("machine") or {}
    cpu = device.get("cpu") or result.get("cpu")
    parts = [cpu] if cpu else []
    if device.get("cores"):
        parts.append(f"{device['cores']} cores")
    gpu = device.get("gpu") or result.get("gpu")
    parts.append(f"GPU: {gpu if isinstance(gpu, str) else gpu['name'] if isinstance(gpu, dict) and 'name' in gpu else gpu}"
                 if gpu else "no GPU")
    return ", ".join(str(p) for p in parts)


def moved_config_note(command: str) -> str:
    """Where a config a recorded command names lives now, when it has moved (commands are kept as they ran)."""
    notes = []
    for path in re.findall(r"\S+\.ya?ml", command):
        if not (ROOT / path).exists() and (ROOT / "benchmarks" / "configs" / Path(path).name).exists():
            notes.append(f"`{path}` is now `benchmarks/configs/{Path(path).name}`")
    return f" ({'; '.join(notes)})" if notes else ""


def header(name: str, result: dict) -> list[str]:
    """A section's heading with the command that made it and the machine."""
    command = result.get("command")
    lines = [f"### {name}\n"]
    facts = []
    if command:
        facts.append(f"Command: {code(command)}{moved_config_note(command)}.")
    facts.append(f"Machine: {machine(result)}.")
    if result.get("split"):
        facts.append(f"Split: **{result['split']}**.")
    lines.append(" ".join(facts) + "\n")
    return lines


def save(fig, img_dir: Path, name: str) -> str:
    """Write the figure as ``img/<name>.png``; returns the Markdown that shows it."""
    fig.tight_layout()
    fig.savefig(img_dir / f"{name}.png", dpi=90)
    plt.close(fig)
    return f"![{name}](img/{name}.png)\n"


def interval_plot(labels: list[str], series: dict[str, list], title: str, img_dir: Path, name: str,
                  zero_line: float | None = None) -> str:
    """Horizontal error bars, one panel per series: estimate with its 95% interval for each label."""
    width = 3.4 * len(series) + 0.075 * max(len(label) for label in labels)
    fig, axes = plt.subplots(1, len(series), figsize=(width, 0.4 * len(labels) + 1.4), squeeze=False, sharey=True)
    for ax, (metric, values) in zip(axes[0], series.items()):
        ys = [i for i, v in enumerate(values) if is_interval(v)]
        est = [values[i][0] for i in ys]
        err = [[values[i][0] - values[i][1] for i in ys], [values[i][2] - values[i][0] for i in ys]]
        ax.errorbar(est, ys, xerr=err, fmt="o", capsize=3)
        if zero_line is not None:
            ax.axvline(zero_line, color="grey", linewidth=0.8)
        ax.set_title(metric.replace("_", " ").replace("auc", "AUC"), fontsize=9)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return save(fig, img_dir, name)


def ratio_plot(labels: list[str], ratios: list[float], title: str, img_dir: Path, name: str) -> str:
    """Bars of ``ratio`` (ours over the peer's), with the peer's 1.0 drawn as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(labels) + 1.3))
    colours = ["tab:green" if r >= 1 else "tab:orange" for r in ratios]
    ax.barh(range(len(labels)), ratios, color=colours)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio against the peer (1.0 = as fast)")
    ax.set_title(title, fontsize=10)
    return save(fig, img_dir, name)


# ------------------------------------------------------------------------------------------------ shapes


def is_study(result: dict) -> bool:
    models = result.get("models")
    return isinstance(models, dict) and any(isinstance(m, dict) and "balanced_accuracy" in m for m in models.values())


def study(name: str, result: dict, img_dir: Path) -> list[str]:
    """A whole study: per-model figures with intervals, Grad-CAM quality, stage times."""
    data = result.get("data", {})
    parts = header(name, result)
    parts.append(f"{data.get('num_images', '?')} images ({data.get('splits', '')}), cached at "
                 f"{data.get('image_size', '?')} px; config {code(result.get('config', '-'))}; "
                 f"{result.get('total_seconds', 0) / 60:.1f} min end to end.\n")
    columns = ["pretrained", "n", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "malignant_auc",
               "sensitivity_at_90_specificity", "ece_before", "ece_after"]
    models = result["models"]
    parts.append(table(["model"] + [c.replace("_", " ") for c in columns],
                       [[m] + [fmt(row.get(c)) for c in columns] for m, row in models.items()]))
    parts.append(interval_plot(list(models), {k: [models[m].get(k) for m in models]
                                              for k in ("balanced_accuracy", "malignant_auc")},
                               f"{name}: 95% lesion-bootstrap intervals", img_dir, name))
    cams = result.get("explanations") or []
    if cams:
        keys = ["n_images", "energy_inside", "mask_share", "pointing_game", "road", "confidence_change"]
        parts.append("Grad-CAM against the lesion masks (chance = `mask share`) and its faithfulness:\n")
        parts.append(table(["model", "method"] + [k.replace("_", " ") for k in keys],
                           [[c["model"], c["method"]] + [fmt(c.get(k)) for k in keys] for c in cams]))
    stages = result.get("stages") or {}
    if stages:
        parts.append(table(["stage", "status", "seconds", "note"],
                           [[s, r.get("status"), "-" if r.get("seconds") is None else round(r["seconds"]),
                             r.get("note", "")] for s, r in stages.items()]))
    return parts


def studies_overview(group: list[tuple[str, dict]], img_dir: Path) -> list[str]:
    """Every study scored on the test split side by side: the ensemble's figures with their intervals."""
    tested = [(name, result["models"]["ensemble"]) for name, result in group
              if result.get("split") == "test" and "ensemble" in result["models"]]
    if len(tested) < 2:
        return []
    series = {k: [ensemble.get(k) for _, ensemble in tested] for k in ("balanced_accuracy", "malignant_auc")}
    return ["The ensemble of every study scored on the test split (each study's own split of its data):\n",
            interval_plot([name for name, _ in tested], series, "ensembles on the test split, 95% intervals",
                          img_dir, "studies-test")]


def is_paired(result: dict) -> bool:
    rows = rows_of(result)
    return bool(rows) and any("difference" in key for key in rows[0])


def paired(name: str, result: dict, img_dir: Path) -> list[str]:
    """A comparison of two ways on the same lesions: each row's figures and paired differences with intervals."""
    rows = rows_of(result)
    keys = [k for k in rows[0] if k not in ("baseline", "variant", "model", "arch")]
    label_keys = [k for k in ("variant", "baseline", "model") if k in rows[0]]
    labels = [" vs ".join(str(r[k]) for k in label_keys[:2]) for r in rows]
    parts = header(name, result)
    parts.append(table(label_keys + [k.replace("_", " ") for k in keys],
                       [[r[k] for k in label_keys] + [fmt(r.get(k)) for k in keys] for r in rows]))
    differences = {k: [r.get(k) for r in rows] for k in keys if "difference" in k and any(is_interval(r.get(k))
                                                                                           for r in rows)}
    if differences:
        parts.append(interval_plot(labels, differences, f"{name}: paired differences, 95% intervals", img_dir, name,
                                   zero_line=0.0))
    return parts


def is_shift(result: dict) -> bool:
    rows = rows_of(result)
    return bool(rows) and "shift" in rows[0]


def shift(name: str, result: dict, img_dir: Path) -> list[str]:
    """Robustness: the same test images with each shift applied, quality with intervals per shift."""
    rows = rows_of(result)
    keys = [k for k in rows[0] if k != "shift"]
    parts = header(name, result)
    if result.get("color_constancy"):
        parts.append(f"Colour constancy: {code(result['color_constancy'])}; `ratio` = malignant AUC over the clean "
                     "images'.\n")
    parts.append(table(["shift"] + [k.replace("_", " ") for k in keys],
                       [[r["shift"]] + [fmt(r.get(k)) for k in keys] for r in rows]))
    labels = [r["shift"] for r in rows]
    parts.append(interval_plot(labels, {k: [r.get(k) for r in rows] for k in ("balanced_accuracy", "malignant_auc")},
                               f"{name}: 95% lesion-bootstrap intervals", img_dir, name))
    return parts


def is_ratio(result: dict) -> bool:
    rows = rows_of(result)
    return bool(rows) and "ratio" in rows[0]


LABEL_KEYS = ("server", "engine", "setup", "model", "endpoint", "processes", "images", "clients", "data")


def ratio(name: str, result: dict, img_dir: Path) -> list[str]:
    """Ours against a peer: every row, and the rows that are not the peer itself as ratio bars."""
    rows = rows_of(result)
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    parts = header(name, result)
    parts.append(table([k.replace("_", " ") for k in keys], [[fmt(r.get(k)) for k in keys] for r in rows]))
    label_keys = [k for k in LABEL_KEYS if k in rows[0] and len({str(r.get(k)) for r in rows}) > 1]
    ours = [r for r in rows if r.get("ratio") is not None and not _is_peer(r)]
    if ours:
        labels = [" / ".join(f"{r.get(k)}" for k in label_keys) or name for r in ours]
        parts.append(ratio_plot(labels, [r["ratio"] for r in ours], f"{name}: ratio against the peer", img_dir, name))
    return parts


def _is_peer(row: dict) -> bool:
    """The peer's own rows (ratio 1 by definition): the baseline server, the DataLoader, the plain loop."""
    text = " ".join(str(row.get(k, "")) for k in ("server", "engine", "setup")).lower()
    return any(word in text for word in ("baseline", "dataloader", "plain")) or row.get("shift") == "clean"


def scalars(name: str, result: dict, img_dir: Path) -> list[str]:
    """Anything else: its top-level figures and the named figures one level down."""
    skip = {"command", "versions", "device", "machine", "samples", "name", "benchmark"}
    rows = []
    for key, value in result.items():
        if key in skip:
            continue
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            rows += [[f"{key}.{k}", fmt(v)] for k, v in value.items()]
        elif not isinstance(value, (dict, list)) or is_interval(value) or (isinstance(value, list) and len(value) < 6):
            rows.append([key, fmt(value)])
    return header(name, result) + [table(["figure", "value"], rows)]


SHAPES: list[tuple[str, Callable[[dict], bool], Callable]] = [
    ("Studies on real data", is_study, study),
    ("Choices compared on the same lesions", is_paired, paired),
    ("Robustness to a simulated second dermatoscope", is_shift, shift),
    ("Speed against peers", is_ratio, ratio),
    ("Other measurements", lambda result: True, scalars),
]

INTRO = """# Results

Every figure on this page is generated by `docs/gen.py` from the JSON files in `benchmarks/results/` that the
benchmarks write (how to run each: `benchmarks/README.md`). Each section names the command that made it and the
machine it ran on, as recorded; commands are kept as they ran (scripts then ran as `python benchmarks/NAME.py`, now
`python -m benchmarks.NAME`). Brackets are 95% bootstrap intervals over lesions (a lesion's images are resampled
together); a paired difference whose interval excludes 0 is a real one. `ratio` is ours over the peer's (the
plain PyTorch loop, the DataLoader, one uvicorn process; above 1 is faster). The machines are shared, so treat
absolute times as rough. Why each figure mattered: [decisions](../decisions.md).
"""


def results_page(paths: list[Path], img_dir: Path) -> str:
    """The whole page: the results grouped by shape, studies on the test split before those on validation."""
    import json

    results = [(p.stem, json.loads(p.read_text())) for p in paths]
    parts = [INTRO]
    for title, matches, render in SHAPES:
        group = [(n, r) for n, r in results if matches(r)]
        results = [(n, r) for n, r in results if not matches(r)]
        if not group:
            continue
        group.sort(key=lambda item: (item[1].get("split") == "val", item[0]))
        parts.append(f"## {title}\n")
        if render is study:
            parts += studies_overview(group, img_dir)
        for name, result in group:
            parts += render(name, result, img_dir)
    return "\n".join(parts)
