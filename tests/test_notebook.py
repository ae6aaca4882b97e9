"""examples/quickstart.ipynb runs from top to bottom and its results hold (so the notebook cannot rot).

The notebook is executed by a real Jupyter kernel (nbclient + ipykernel) in a temporary directory; its last cell
prints a JSON summary, which the test reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running it in a fresh directory (outputs/ is written there)."""
    workdir = tmp_path_factory.mktemp("notebook")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook, workdir


def _stdout(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("name") == "stdout")


def test_notebook_is_stored_without_outputs():
    """Outputs would go stale in the repository; the notebook is kept clean and CI produces them."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


def test_quickstart_trains_evaluates_chats_and_merges(executed):
    notebook, workdir = executed
    summary = json.loads(_stdout(notebook.cells[-1]).strip().splitlines()[-1])
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]  # 4.42 -> 1.31 measured: the data is learnt
    assert summary["tuned_loss"] < summary["base_loss"]
    assert summary["reply"]  # the chat turn answered
    assert summary["merged_reply"] == summary["reply"]  # merged = base + adapter (greedy decoding)
    run_dir = workdir / "outputs" / "quickstart"
    for name in ("adapter_config.json", "metrics.json", "phitune_config.yaml", "eval.json"):
        assert (run_dir / name).is_file(), name
    assert list((workdir / "outputs" / "quickstart-merged").glob("*.safetensors"))
