"""Spectral-slice certificate (intruder/spectral/slices.py) against the float64 LAPACK reference.

Planted intruder-heavy pairs: a power-law base (plus, in the adversarial cases, a degenerate
cluster or an intruder that nearly matches one bulk vector) and a rank-4 update along new
directions with strengths among the base's top singular values. Every bound must lie above
the exact left-out maximum; the engine's decisions must equal the reference's at every epsilon,
its exact values agree to 1e-10 and its flagged values bound the exact ones from above.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from intruder.spectral.engine import analyse, base_eig
from intruder.spectral.partial import gram
from intruder.spectral.reference import reference_intruders
from intruder.spectral.slices import bank, inverse_gram, leftout_bound
from intruder.types import ScanConfig

EPS = (0.5, 0.7, 0.9)
SHAPES = [(384, 384), (640, 320), (320, 640)]


def _planted(m, n, seed=0, alpha=0.4, rank=4, cluster=False, near_bulk=None):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -alpha
    s = (s * (1 + 0.02 * torch.randn(r, generator=g, dtype=torch.float64))).abs()
    s = s.sort(descending=True).values
    if cluster:  # a degenerate block in the bulk and a tight one just below the kept top
        s[60:160] = s[60]
        s[34:40] = s[34] * (1 + 1e-9 * torch.arange(6, dtype=torch.float64))
        s = s.sort(descending=True).values
    w0 = (u * s) @ v.mT
    a = torch.randn(m, rank, generator=g, dtype=torch.float64)
    b = torch.randn(n, rank, generator=g, dtype=torch.float64)
    if near_bulk is not None:  # the first new direction nearly matches bulk vector 150
        c = near_bulk
        a[:, 0] = c * u[:, 150] + (1 - c * c) ** 0.5 * _orth_to(a[:, 0], u[:, 150])
    a = a / a.norm(dim=0)
    b = b / b.norm(dim=0)
    st = s[torch.tensor([1, 3, 5, 8])[:rank]]
    if near_bulk is not None:  # the planted direction alone on top: t_0 keeps its bulk overlap
        a, b, st = a[:, :1], b[:, :1], 1.5 * s[:1]
    wt = w0 + (a * st) @ b.mT
    return w0, wt


def _orth_to(x, y):
    x = x - y * (y @ x)
    return x / x.norm()


def _exact(w0, wt, side, k=10, kept=32):
    a0 = np.linalg.svd(w0.numpy(), full_matrices=False)
    at = np.linalg.svd(wt.numpy(), full_matrices=False)
    b = a0[0] if side == "left" else a0[2].T
    t = at[0] if side == "left" else at[2].T
    sim = np.abs(t[:, :k].T @ b)  # (k, r)
    return t[:, :k], sim[:, kept:].max(axis=1)


def test_filter_bank_floors():
    fb = bank()
    assert (fb.floor > 0.9).all() and (fb.floor < 1.2).all()
    assert fb.x_hi[0] == 1.0 and abs(fb.x_lo[-1] + 1.0) < 1e-15


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_leftout_bound_above_exact(shape, side):
    w0, wt = _planted(*shape, seed=1)
    e = base_eig(w0, 32)
    assert not e.complete and e.r == 32
    t, out = _exact(w0, wt, side)
    bd = leftout_bound(w0, e, torch.from_numpy(t.copy()), torch.zeros(10, dtype=torch.float64),
                       side)
    assert bd is not None
    assert (bd.numpy() >= out).all()
    assert float(bd.max()) < 0.7  # useful: far below what orthonormality alone gives (~1)


@pytest.mark.parametrize("near", [0.45, 0.52, 0.9])
def test_leftout_bound_near_bulk_vector(near):
    w0, wt = _planted(384, 384, seed=2, near_bulk=near)
    e = base_eig(w0, 32)
    t, out = _exact(w0, wt, "left")
    bd = leftout_bound(w0, e, torch.from_numpy(t.copy()), None, "left")
    assert bd is not None and (bd.numpy() >= out).all()


def test_leftout_bound_clustered_spectrum():
    w0, wt = _planted(384, 384, seed=3, cluster=True)
    e = base_eig(w0, 32)
    t, out = _exact(w0, wt, "left")
    bd = leftout_bound(w0, e, torch.from_numpy(t.copy()), None, "left")
    assert bd is None or (bd.numpy() >= out).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_gram_fences_the_exact_inverse_spectrum(shape):
    # [lo, hi] must hold every eigenvalue of the exact G^-1 (hi from the device-side Lanczos
    # estimate, proved by a Cholesky factorization), and not loosely: the slices' resolution
    # is (hi - lo) / degree
    w0, _ = _planted(*shape, seed=5)
    side = "left" if shape[0] <= shape[1] else "right"
    inv = inverse_gram(w0, side)
    assert inv is not None
    g = gram(w0, side).numpy()
    mu = 1.0 / np.linalg.eigvalsh(g)  # exact inverse spectrum (LAPACK, float64)
    assert inv.lo <= mu.min() and mu.max() <= inv.hi
    assert inv.hi <= 1.05 * mu.max()
    assert np.abs(inv.h.numpy() - np.linalg.inv(g)).max() <= inv.rho * 1.01 + 1e-300


def test_singular_base_refused():
    w0, wt = _planted(384, 384, seed=4)
    u, s, vh = torch.linalg.svd(w0)
    s[200:] = 0.0  # rank 200: no Cholesky of the Gram, no inverse
    w0 = (u * s) @ vh
    e = base_eig(w0, 32)
    t, _ = _exact(w0, wt, "left")
    assert leftout_bound(w0, e, torch.from_numpy(t.copy()), None, "left") is None


def _check_engine(w0, wt, dtype, vectors="left", seed=0):
    w0 = w0.to(dtype)
    wt = wt.to(dtype)
    cfg = ScanConfig(epsilons=EPS, vectors=vectors)
    f, _ = analyse(w0, wt, cfg, f"m{seed}")
    ref = reference_intruders(w0.double().numpy(), wt.double().numpy(), 10, 0.5, vectors)
    mc = np.array(f.max_cos)
    bound = np.array(f.max_cos_bound or [False] * len(mc), dtype=bool)
    for e in EPS:
        assert ((mc < e) == (ref.max_cos < e)).all(), (e, mc, ref.max_cos)
    assert np.abs(mc[~bound] - ref.max_cos[~bound]).max() < 1e-10
    assert (mc[bound] >= ref.max_cos[bound] - 1e-12).all()
    assert [i.max_cos_bound for i in f.intruders] == [bool(bound[i.index]) for i in f.intruders]
    return f


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_slices_match_reference(shape, dtype, monkeypatch):
    monkeypatch.setenv("INTRUDER_SLICE_MIN_DIM", "256")
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "128")
    w0, wt = _planted(*shape, seed=5)
    f = _check_engine(w0, wt, dtype)
    assert "+slices" in f.method and "[top 32]" in f.method  # no complete base
    assert f.intruders


@pytest.mark.parametrize("case", ["near45", "near52", "cluster", "right"])
def test_engine_adversarial(case, monkeypatch):
    monkeypatch.setenv("INTRUDER_SLICE_MIN_DIM", "256")
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "128")
    kw = {"near45": {"near_bulk": 0.45}, "near52": {"near_bulk": 0.52},
          "cluster": {"cluster": True}, "right": {}}[case]
    w0, wt = _planted(384, 384, seed=6, **kw)
    _check_engine(w0, wt, torch.float32, vectors="right" if case == "right" else "left")


def test_slices_disabled_gives_complete_base(monkeypatch):
    monkeypatch.setenv("INTRUDER_SLICE_MIN_DIM", "0")
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "128")
    w0, wt = _planted(384, 384, seed=5)
    f = _check_engine(w0, wt, torch.float32)
    assert "+slices" not in f.method and not f.max_cos_bound


def test_fleet_shares_the_inverse_gram(monkeypatch):
    """Two fine-tunes of one base with one scratch dict (as a compare group): the base's inverse
    Gram is computed once and both results match the reference."""
    import intruder.spectral.slices as slices

    monkeypatch.setenv("INTRUDER_SLICE_MIN_DIM", "256")
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "128")
    calls = []
    real = slices.inverse_gram
    monkeypatch.setattr(slices, "inverse_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    w0, wt1 = _planted(384, 384, seed=5)
    _, wt2 = _planted(384, 384, seed=5, rank=2)
    cfg = ScanConfig(epsilons=EPS)
    scratch: dict = {}
    spec = None
    for wt in (wt1, wt2):
        f, spec = analyse(w0, wt, cfg, "m", base_spec=spec, scratch=scratch)
        ref = reference_intruders(w0.numpy(), wt.numpy(), 10, 0.5)
        mc = np.array(f.max_cos)
        for e in EPS:
            assert ((mc < e) == (ref.max_cos < e)).all()
        assert "+slices" in f.method
    assert len(calls) == 1


def test_upper_bounds_said_in_json_table_and_html(tmp_path, monkeypatch):
    """A scan whose max|cos| includes a certified upper bound: the JSON flags it per vector (and
    on the intruder), the report loads back with the flag, the table writes <=, the HTML ≤."""
    import json

    import synthetic
    from click.testing import CliRunner

    from intruder.cli import cli
    from intruder.report.schema import load_report

    monkeypatch.setenv("INTRUDER_SLICE_MIN_DIM", "256")
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "128")
    w0, wt = _planted(384, 384, seed=6, cluster=True)
    name = "model.layers.0.self_attn.o_proj.weight"
    b, t = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    synthetic.write_safetensors(b, {name: w0.numpy()})
    synthetic.write_safetensors(t, {name: wt.numpy()})
    out, page = str(tmp_path / "r.json"), str(tmp_path / "r.html")
    res = CliRunner().invoke(cli, ["scan", b, t, "--no-cache", "--device", "cpu", "--epsilon",
                                   "0.5,0.7,0.9", "-o", out, "--html", page])
    assert res.exit_code == 0, res.output
    layer = json.load(open(out))["layers"][0]
    assert "+slices" in layer["method"] and any(layer["max_cos_bound"])
    j = layer["max_cos_bound"].index(True)
    ref = reference_intruders(w0.float().double().numpy(), wt.float().double().numpy(), 10)
    assert layer["max_cos"][j] >= ref.max_cos[j]
    flagged = [i for i in layer["intruders"] if i["max_cos_bound"]]
    assert [i["index"] for i in flagged] == [j] if layer["max_cos"][j] < 0.5 else not flagged
    assert load_report(out).layers[0].max_cos_bound == tuple(layer["max_cos_bound"])
    assert "certified upper bounds" in res.output
    html = open(page, encoding="utf-8").read()
    if flagged:
        assert "\u2264 " in html and "certified upper" in html
