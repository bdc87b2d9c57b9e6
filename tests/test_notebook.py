"""``examples/reroute_tour.ipynb``: committed as its generator writes it, and it runs end to end on the testbed."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "reroute_tour.ipynb"
METHODS = ("base", "c3po (ngd)", "rerouting", "scmoe", "oracle")


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebook", EXAMPLES / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_matches_its_generator():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(committed)
    built = _generator().build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells]
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)  # committed without outputs
    # plots come from the library: no notebook cell draws with matplotlib itself
    assert not any("plt." in c.source or "import matplotlib" in c.source for c in code)


def test_notebook_runs(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from nbclient import NotebookClient

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no python3 Jupyter kernel installed")
    # the kernel imports this checkout's reroute, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # every cell that ends with a reroute.plot call shows its figure
    plot_cells = [c for c in code if c.source.strip().splitlines()[-1].startswith("reroute.plot.")]
    assert len(plot_cells) >= 7
    for cell in plot_cells:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    table = " ".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
    assert all(name in table for name in METHODS)
    print(f"notebook executed in {seconds:.1f} s")
