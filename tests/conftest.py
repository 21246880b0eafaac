"""Shared fixtures: the seeded synthetic suite (built once per session) and data paths."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "fixtures")):
    if p not in sys.path:
        sys.path.insert(0, p)


def data_dir() -> str:
    """Shared evaluation data: $INTRUDER_DATA_DIR or ../shared/data beside the checkout."""
    return os.environ.get("INTRUDER_DATA_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """Paths of the synthetic suite (fixtures/synthetic.py build_suite) and the planted truth."""
    import json

    import synthetic

    out = tmp_path_factory.mktemp("synth")
    paths = synthetic.build_suite(str(out), seed=0)
    with open(out / "truth.json") as fh:
        paths["truth"] = json.load(fh)
    return paths


@pytest.fixture(scope="session")
def shared_data():
    d = data_dir()
    if not os.path.isdir(d):
        pytest.skip(f"shared data not found at {d} (set INTRUDER_DATA_DIR)")
    return d
