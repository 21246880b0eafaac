"""The notebooks are stored without outputs and run top to bottom (nbclient, kernel python3) on
the quick build of the demo models; any failing cell fails the test.

The quick demo (fixtures/build_demo.py --quick, about 40 s on 2 cores) is built once per session
unless INTRUDER_DEMO_DIR names an existing build."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("01_walkthrough.ipynb", "02_continual_learning.ipynb")


def _read(name):
    import nbformat

    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
    import nbformat

    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, shared_data):
    given = os.environ.get("INTRUDER_DEMO_DIR")
    if given:
        if not os.path.isfile(os.path.join(given, "manifest.json")):
            pytest.fail(f"INTRUDER_DEMO_DIR={given} holds no manifest.json")
        return given
    out = tmp_path_factory.mktemp("demo-quick")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "fixtures", "build_demo.py"), "--quick",
                        "--quiet", "--out", str(out), "--data-dir", shared_data],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, quick_demo, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("INTRUDER_DEMO_DIR", quick_demo)  # the kernel inherits the environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = _read(name)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()  # raises on a failed cell
    seconds = time.perf_counter() - t0
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    images = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(images) >= (7 if name.startswith("01") else 5), len(images)
    text = "".join(o.get("text", "") for o in outs)
    assert "quick test build" in text or "full build" in text
    if name.startswith("01"):
        assert "AuditInfo(" in text  # the audit page was written
    print(f"{name}: {seconds:.1f} s")
