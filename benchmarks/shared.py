"""What every benchmark shares: the machine it ran on, and its section of benchmarks/README.md."""

import platform
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_section(name: str, body: str) -> None:
    """Put ``body`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of benchmarks/README.md
    (appended when the markers are absent), keeping everything else."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)
