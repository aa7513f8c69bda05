"""Execute a notebook top to bottom with its `parameters` cell overridden (smoke mode).

Like papermill: the overrides go into a new cell right after the cell tagged `parameters`, so the
notebook's own defaults (Kaggle paths, SD v1.5) stay readable while tests run it on `tiny`.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient


def parameters_cell_index(nb) -> int:
    """Index of the cell tagged `parameters`; it must be the first code cell."""
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [i for i in code if "parameters" in c_tags(nb.cells[i])]
    if not tagged:
        raise AssertionError("notebook has no code cell tagged 'parameters'")
    if tagged[0] != code[0]:
        raise AssertionError("the 'parameters' cell must be the first code cell")
    return tagged[0]


def c_tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def run_notebook(path: str | Path, params: dict, *, cwd: str | Path | None = None, timeout: int = 900):
    """Run `path` with `params` injected after its parameters cell; returns the executed notebook."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    idx = parameters_cell_index(nb)
    source = "# injected by tests/notebook_harness.py (smoke mode)\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items()
    )
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(cwd or path.parent)}},
    )
    client.execute()
    return nb


def cell_outputs_text(nb) -> str:
    """All stream/text outputs of an executed notebook, joined (for assertions)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)
