"""Every notebook in notebooks/ runs top to bottom without errors and shows its results as plots.

The kernel runs with ``DAMI_JAX_NOTEBOOK_SMALL=1``: a notebook whose full sizes are too slow for
the suite (tailorkv, on SmolLM2) reads it in its parameters cell and picks small sizes; the toy
pair's notebooks are small anyway.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))

# One notebook at a time: a SmolLM2 notebook's kernel holds ~5 GB at its peak, and two of them
# beside two busy pytest workers come close to a 24 GB machine's memory.
pytestmark = pytest.mark.xdist_group("notebooks")


def uses_smollm2(path: Path) -> bool:
    """Notebooks on the real SmolLM2 (its checkpoint or its pinned pair): slow (compiling a 30-layer
    model dominates, even at small sizes)."""
    return re.search(r"smollm2_checkpoint|load_pair\(['\"]smollm2", path.read_text()) is not None


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if uses_smollm2(p) else []) for p in NOTEBOOKS]
)
def test_notebook_runs(path: Path, tmp_path, monkeypatch, request) -> None:
    notebook = nbformat.read(path, as_version=4)
    if uses_smollm2(path):
        request.getfixturevalue("smollm2_path")  # converted once; skips (fails under CI) without its package
    monkeypatch.setenv("DAMI_JAX_NOTEBOOK_SMALL", "1")  # the kernel inherits the environment
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "a notebook should show its results as plots"


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, "notebooks/ should hold at least one notebook"
