"""`import lesion` and every module under it loads no Ray (Ray lives in pipelines/ only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, pkgutil, sys
import lesion
names = [m.name for m in pkgutil.walk_packages(lesion.__path__, "lesion.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(len(names), "modules")
assert not loaded, f"lesion imported ray: {loaded[:5]}"
"""


def test_lesion_imports_no_ray():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[0]) >= 10  # the walk really found the package's modules
