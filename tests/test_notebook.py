"""notebooks/quickstart.ipynb runs top to bottom (a few training steps) and draws pictures."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_runs_and_draws(tmp_path, monkeypatch):
  monkeypatch.setenv("GTA_JAX_QUICK", "1")  # the kernel inherits the environment
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) >= 2
  text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.outputs)
  assert "val top-1" in text and "rotating_clockwise" in text
  assert os.path.exists(tmp_path / "quickstart_run" / "metrics.jsonl")
