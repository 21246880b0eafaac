"""The in-memory alpha sweep: the in-place rescaler against the written checkpoints, bit-exact
restoration, sweep results against file-based evaluation, lm-eval tasks, several workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from intruder.errors import ReportError
from intruder.inplace import InPlaceRescaler
from intruder.intervene import scale_checkpoint
from intruder.scan import run_scan
from intruder.types import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "fixtures", "demo", "models")


@pytest.fixture(scope="module")
def demo_pair():
    base, tuned = os.path.join(DEMO, "base"), os.path.join(DEMO, "lora_r8")
    if not os.path.isfile(os.path.join(tuned, "model.safetensors")):
        pytest.skip("demo models not built")
    report = run_scan(base, tuned, ScanConfig(device="cpu", cache_dir=None))
    assert sum(len(l.intruders) for l in report.layers) > 10
    return base, tuned, report


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _storage(report):
    return {l.name: torch.float16 for l in report.layers}


@pytest.mark.parametrize("chunk", [None, 1000])
def test_inplace_equals_written_checkpoint_and_restores(demo_pair, tmp_path, monkeypatch, chunk):
    """Every weight at alpha equals the written alpha checkpoint's (float16 stored, loaded as
    float32); back at alpha = 1 every parameter is bit for bit what was loaded."""
    if chunk:  # row blocks of a few rows: the path large matrices take
        monkeypatch.setattr("intruder.inplace.CHUNK_ELEMENTS", chunk)
    base, tuned, report = demo_pair
    alphas = [0.0, 0.5, 1.7]
    outs = [str(tmp_path / f"a{i}") for i in range(len(alphas))]
    written = scale_checkpoint(report, alphas, outs, base=base, tuned=tuned, device="cpu")
    model = _load(tuned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = InPlaceRescaler(model, report, storage_dtypes=_storage(report))
    assert r.n_intruders == written[0].n_intruders and len(r.targets) == len(written[0].layers)
    for a, out, w in zip(alphas, outs, written):
        changes = r.set_alpha(a)
        ref = _load(out).state_dict()
        for k, v in model.state_dict().items():
            # one float16 unit in the last place at most (float64 row blocks may round apart)
            np.testing.assert_allclose(v.numpy(), ref[k].numpy(), rtol=2 ** -10, atol=0)
        got = {c.name: c.rel_change for c in changes}
        for lc in w.layers:
            assert got[lc.name] == pytest.approx(lc.rel_change, rel=1e-6, abs=1e-12)
    r.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert v.dtype == before[k].dtype


def test_inplace_refuses_another_model(demo_pair):
    base, _, report = demo_pair
    with pytest.raises(ReportError, match="singular values recomputed"):
        InPlaceRescaler(_load(base), report)
