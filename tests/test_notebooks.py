"""Execute the notebooks in notebooks/ headlessly, with small settings (LATENTDIFF_NOTEBOOK_QUICK=1).

They need the bundled model (weights/shapes-tiny); LATENTDIFF_NOTEBOOK_MODEL=FOLDER runs them on another model
folder of the same kind instead (e.g. a random one from `python -m latentdiff.training.scratch`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from latentdiff.pipeline import BUNDLED_MODEL

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_forward_process.ipynb", "02_sampling_and_guidance.ipynb", "03_finetune.ipynb"]
CELL_TIMEOUT_S = 300


def _model() -> str | None:
    model = os.environ.get("LATENTDIFF_NOTEBOOK_MODEL")
    if model is None and not (BUNDLED_MODEL / "model_index.json").is_file():
        pytest.skip(
            f"the bundled model is not in this checkout ({BUNDLED_MODEL}); build it with "
            "training/recipes/default/run.sh, or set LATENTDIFF_NOTEBOOK_MODEL to a model folder"
        )
    return model


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    _model()
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{name} is stored with outputs; clear them before committing"
    )
    # The kernel inherits this environment: quick settings, outputs in tmp_path, one thread per xdist worker.
    monkeypatch.setenv("LATENTDIFF_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("LATENTDIFF_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        monkeypatch.setenv("OMP_NUM_THREADS", "1")

    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    figure = tmp_path / f"{Path(name).stem}.png"  # each notebook saves its headline figure (the README's)
    assert figure.is_file(), f"{name} did not write {figure.name}"
