"""notebooks/quickstart.ipynb runs end to end (short), and is committed without stale outputs."""
import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, f"cells {stale} carry outputs: clear them before committing"


@pytest.mark.timeout(900)
def test_notebook_runs(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("EFFT_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("EFFT_NOTEBOOK_NEW_TOKENS", "8")
    monkeypatch.setenv("EFFT_NOTEBOOK_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("EFFT_NOTEBOOK_OVERRIDES", "data.max_seq_length=64 train.per_device_train_batch_size=2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "fits" in text  # the estimate's verdict
    assert "in 2 steps" in text
    assert "peak" in text  # the memory report
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
