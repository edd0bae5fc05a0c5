"""``examples/quickstart.ipynb`` runs from top to bottom in a fresh kernel on the session's trained run (passed in
``LESION_RUN``) with a real HAM10000 image (``LESION_IMAGE``), and shows what it promises."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat (a test extra) is not installed")
nbclient = pytest.importorskip("nbclient", reason="nbclient (a test extra) is not installed")
pytest.importorskip("ipykernel", reason="ipykernel (a test extra) is not installed")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def outputs(cell) -> str:
    """A code cell's printed and displayed text."""
    texts = []
    for output in cell.get("outputs", []):
        texts.append(output.get("text", ""))
        texts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(texts)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_notebook_runs_on_a_trained_run(trained_run, ham10000_fullres, tmp_path, monkeypatch):
    run = shutil.copytree(trained_run.root, tmp_path / "run")
    image = sorted((ham10000_fullres / "images").glob("*.jpg"))[0]
    monkeypatch.setenv("LESION_RUN", str(run))
    monkeypatch.setenv("LESION_IMAGE", str(image))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not any(o.get("output_type") == "error" for o in cell.get("outputs", [])) for cell in code)
    text = "\n".join(outputs(cell) for cell in code)
    assert "Classifier(models=" in text and "p(malignant) = " in text and "abstained:" in text
    assert "malignant_probability" in text and "probability" in text
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.get("outputs", []))
