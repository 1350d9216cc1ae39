"""examples/notebook.ipynb, executed in a real Jupyter kernel (nbclient): the displays
render as HTML, re-running the edited mode cell uses the edited mode, progress shows."""

from __future__ import annotations

import copy
import os

import pytest

from _optional import optional_import

nbformat = optional_import("nbformat", "nbformat")
nbclient = optional_import("nbclient", "nbclient")
optional_import("ipykernel", "ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "notebook.ipynb")

pytestmark = pytest.mark.slow  # a kernel start and torch import: ~10-20 s (CI runs -m slow)


def _text(outputs, name=None) -> str:
    parts = []
    for out in outputs:
        if out["output_type"] == "stream" and (name is None or out["name"] == name):
            parts.append(out["text"])
        elif name is None and "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _html(outputs) -> str:
    return "".join(out.get("data", {}).get("text/html", "") for out in outputs if "data" in out)


def _cell(nb, start: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith(start))


def test_the_notebook_runs_renders_and_reruns_an_edited_mode(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # committed without outputs: the test sees only what it ran
        assert cell.cell_type != "code" or (cell.outputs == [] and cell.execution_count is None)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")  # the kernel imports this tree
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                if cell.cell_type == "code":
                    client.execute_cell(cell, index)
            mode_cell, apply_cell = _cell(nb, "class SwapConfig"), _cell(nb, "model = mto.apply_mode")
            first = copy.deepcopy(nb.cells[apply_cell].outputs)
            # the edit: a new default and the mode applied with it, then both cells again
            edited = nb.cells[mode_cell].source.replace('ModeloptField("tanh")', 'ModeloptField("gelu")')
            assert edited != nb.cells[mode_cell].source
            nb.cells[mode_cell].source = edited
            nb.cells[apply_cell].source = nb.cells[apply_cell].source.replace('{"to": "tanh"}', "{}")
            client.execute_cell(nb.cells[mode_cell], mode_cell)
            client.execute_cell(nb.cells[apply_cell], apply_cell)
    finally:
        os.environ["PYTHONPATH"] = env_path
    cells = nb.cells
    # the registry's repr, the manager's HTML table, describe()'s table
    assert _text(first).startswith("Tanh\n")
    registry_out = _text(cells[mode_cell].outputs)
    assert "<_ModeRegistryCls 'notebook': 1 mode: swap_relu>" in registry_out
    assert "Mode swap_relu re-registered (the class was defined again)" in _text(cells[mode_cell].outputs, "stderr")
    assert _text(cells[apply_cell].outputs, "stdout") == "GELU\n"  # the edited mode, not the stale one
    manager_html = _html(cells[apply_cell].outputs)
    assert "modelopt-c-summary" in manager_html and "<b>swap_relu</b>" in manager_html
    assert "{&quot;to&quot;: &quot;gelu&quot;}" in manager_html
    assert "<th style='text-align:left'>tensors</th>" in _html(cells[_cell(nb, "mto.describe(model)")].outputs)
    save_cell = cells[_cell(nb, "mto.save(model")]
    progress = _text(save_cell.outputs, "stderr")
    assert "saving notebook_ckpt.pt: 100%" in progress and "restoring notebook_ckpt.pt: 100%" in progress
    assert _text(save_cell.outputs, "stdout") == "Tanh {'step': 1}\n"
    assert "format</th><td style='text-align:left'>torch" in _html(save_cell.outputs)
