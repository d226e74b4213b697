"""docs/quickstart.ipynb cannot rot: it is executed here with a real Jupyter kernel (nbclient + ipykernel, in the
``test`` extra), and it is committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, smollm2, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, so plots become outputs
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = ["".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in c.outputs) for c in code]
    assert not any("IProgress not found" in s for s in text)  # ipywidgets is in the test extra (issue 24)
    assert sum(s.count("sweep: 100%") for s in text) <= 1  # a late bar is drawn once (issue 24), or is a widget
    assert "did you mean `exit_layer`?" in text[2] and "did you mean `stop`?" in text[2]  # errors, all at once
    assert "layers 0, 2-27: plain" in text[4] and "texts/s" in text[4]  # explain in layer ranges; stats
    assert "exit hidden_states[" in text[5]  # the sweep's labelled best cell
    assert any("image/png" in o.get("data", {}) for o in code[6].outputs)  # the sweep's plot
    result = [o for o in code[7].outputs if o.get("output_type") == "execute_result"]  # not a progress bar's stderr
    assert float(result[0]["data"]["text/plain"]) < 1e-3  # TransformerLens agrees with nnsight
