"""Intruder margin: exact measures against numpy, monotone approach to the cliff, audit gates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import synthetic
import torch
from click.testing import CliRunner

from intruder.spectral import margin as M
from intruder.spectral.engine import analyse
from intruder.types import ScanConfig


def _ex(w0, wt, cfg=None):
    """(analysis, its margin, its update shape) of one pair."""
    found, _ = analyse(torch.from_numpy(w0), torch.from_numpy(wt), cfg or ScanConfig())
    assert found.margin is not None and found.update_shape is not None
    return found, found.margin, found.update_shape


def test_planted_direction_switches_on_where_novel_strength_crosses_one():
    """A direction orthogonal to the base's top vectors, strength c: novel strength is exactly
    c / sigma_k(W0), grows monotonically, and the count at 0.5 switches on when it crosses 1."""
    w0, u, s, v = synthetic.base_matrix(96, 144, seed=3)
    x, y = synthetic.planted_direction(u, v, seed=9)
    ratios = [0.1, 0.3, 0.6, 0.9, 0.98, 1.02, 1.1, 1.5, 3.0]
    novel, counts = [], []
    for r in ratios:
        fields, mg, us = _ex(w0, w0 + r * s[9] * np.outer(x, y))
        novel.append(mg.novel_strength)
        counts.append(len(fields.intruders))
        assert mg.novel_strength == pytest.approx(r, rel=1e-6)
        assert mg.cos_margin == pytest.approx(mg.min_max_cos - 0.5)
    assert all(a < b for a, b in zip(novel, novel[1:]))
    assert counts == [0, 0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_of_growing_strength_moves_toward_the_threshold(rank):
    """Random LoRA-like B @ A of growing strength on a spiked base: novel strength rises, the
    lowest max|cos| falls until the first intruder, and 'count > 0' <=> 'cos_margin < 0' always."""
    rng = np.random.default_rng(rank)
    m, n = 96, 128
    w0 = rng.standard_normal((m, n)) / np.sqrt(n)
    uu, _ = np.linalg.qr(rng.standard_normal((m, 6)))
    vv, _ = np.linalg.qr(rng.standard_normal((n, 6)))
    w0 += (uu * np.linspace(8, 3, 6)) @ vv.T
    d = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    d /= np.linalg.norm(d, 2)
    sig_k = np.linalg.svd(w0, compute_uv=False)[9]
    cos, nov, switched = [], [], None
    for i, st in enumerate([0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 4.0]):
        fields, mg, us = _ex(w0, w0 + st * sig_k * d)
        has = len(fields.intruders) > 0
        assert has == (mg.cos_margin < 0)
        cos.append(mg.min_max_cos)
        nov.append(mg.novel_strength)
        if has and switched is None:
            switched = i
    assert switched is not None, cos
    assert all(a <= b + 1e-9 for a, b in zip(nov, nov[1:]))
    assert all(a >= b - 1e-9 for a, b in zip(cos[: switched + 1], cos[1: switched + 1])), cos
    assert cos[0] > 0.99  # nowhere near at 5% of sigma_k


def test_projected_norm_and_principal_angles_match_numpy():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((80, 60))
    wt = w0 + 0.7 * rng.standard_normal((80, 2)) @ rng.standard_normal((2, 60))
    _, mg, us = _ex(w0, wt)
    u0, s0, _ = np.linalg.svd(w0, full_matrices=False)
    ut = np.linalg.svd(wt, full_matrices=False)[0]
    p = np.eye(80) - u0[:, :10] @ u0[:, :10].T
    assert mg.novel_strength == pytest.approx(np.linalg.norm(p @ (wt - w0), 2) / s0[9], rel=1e-6)
    pc = np.linalg.svd(u0[:, :10].T @ ut[:, :10], compute_uv=False)
    assert mg.subspace_cos == pytest.approx(pc.min(), abs=1e-8)
    d = wt - w0
    assert us.stable_rank == pytest.approx(
        np.linalg.norm(d) ** 2 / np.linalg.norm(d, 2) ** 2, rel=1e-8)
    ref = np.linalg.svd(d, compute_uv=False)[:len(us.sv)]
    got = np.array(us.sv)
    big = ref > 1e-6 * ref[0]  # the Gram path resolves values down to about 1e-8 sigma_1
    np.testing.assert_allclose(got[big], ref[big], rtol=1e-8)
    assert (got[~big] < 1e-6 * ref[0]).all() and us.rank == 2


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                                        (torch.float32, "float32")])
def test_storage_grid_and_rounding_rms(dtype, name):
    """Values read back from a dtype sit on its grid; the predicted rms rounding error matches
    the measured one within 10 %."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((200, 300)) * 0.02)  # float64
    stored = x.to(dtype).to(torch.float64)
    grid, bits = M.storage_grid(stored)
    assert grid == name
    measured = float((stored - x).square().mean().sqrt())
    assert M.rounding_rms(stored, bits) == pytest.approx(measured, rel=0.1)
    assert M.storage_grid(x)[0] == "float64"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 3, 8, 24])
def test_delta_rank_of_a_stored_lora_merge(dtype, rank):
    """W0 and W0 + B A stored in a dtype: the rank of dW above the rounding floor is r exactly,
    with a sharp cliff; a dense update of the same size has no cliff below 3/4 of full rank."""
    rng = np.random.default_rng(rank)
    m, n = 96, 160
    w0 = torch.from_numpy(rng.standard_normal((m, n)) * 0.05).to(dtype)
    ba = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    ba *= 0.02 / np.abs(ba).mean()  # LoRA-sized: a few percent of |W|
    wt = (w0.double() + torch.from_numpy(ba)).to(dtype)
    _, mg, us = _ex(w0.double().numpy(), wt.double().numpy())
    assert us.rank == rank and us.rank_seen
    assert us.rank_gap is None or us.rank_gap > 5
    dense = (w0.double() + torch.from_numpy(rng.standard_normal((m, n)) * 0.002)).to(dtype)
    _, _, usd = _ex(w0.double().numpy(), dense.double().numpy())
    assert usd.rank > 0.75 * min(m, n)


def test_randomized_delta_spectrum_agrees_with_exact(monkeypatch):
    rng = np.random.default_rng(4)
    d = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 260)) + 1e-6 * rng.standard_normal((300, 260))
    exact, how = M.delta_singular_values(torch.from_numpy(d))
    assert how == "gram"
    monkeypatch.setattr(M, "EXACT_DELTA_MAX", 100)
    monkeypatch.setattr(M, "RANDOMIZED_Q", 40)
    approx, how = M.delta_singular_values(torch.from_numpy(d))
    assert how == "randomized" and approx.numel() == 40
    np.testing.assert_allclose(approx[:5].numpy(), exact[:5].numpy(), rtol=1e-9)
    rank, gap, seen = M.estimate_rank(approx, 1e-3, d.shape)
    assert (rank, seen) == (5, True) and gap > 1e4


def test_estimate_rank_edge_cases():
    sv = torch.tensor([5.0, 4.0, 3.0])
    assert M.estimate_rank(sv, 10.0, (3, 3)) == (0, float("inf"), True)
    assert M.estimate_rank(sv, 1.0, (3, 3)) == (3, 1.0, False)
    r, gap, seen = M.estimate_rank(torch.tensor([5.0, 4.0, 0.1]), 1.0, (3, 3))
    assert (r, seen) == (2, True) and gap == pytest.approx(40.0)


def test_summary_table_json_and_gates(synth, tmp_path):
    """Dense synthetic fine-tune (no intruders): the summary places it nowhere near the cliff;
    --fail-on-margin / --fail-on-strength exit 4 exactly when their thresholds are crossed."""
    from intruder.cli import cli
    from intruder.report.schema import SCHEMA_VERSION, load_report
    from intruder.report.summary import summary

    out = tmp_path / "r.json"
    runner = CliRunner()
    base, tuned = synth["base_file"], synth["dense_file"]
    res = runner.invoke(cli, ["scan", base, tuned, "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "margin: first intruder at epsilon" in res.output
    assert "provenance: full-ft-like" in res.output
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert tuple(map(int, SCHEMA_VERSION.split("."))) >= (1, 1)  # margin fields since 1.1
    m = doc["summary"]["margin"]
    lay = [l for l in doc["layers"] if l["status"] == "scanned"]
    assert m["first_intruder_epsilon"] == pytest.approx(min(l["min_max_cos"] for l in lay))
    assert m["cos_margin"] == pytest.approx(m["first_intruder_epsilon"] - 0.5)
    top = max(l["novel_strength"] for l in lay)
    assert m["novel_strength_quantiles"]["max"] == pytest.approx(top)
    rep = load_report(str(out))
    again = summary(rep)["margin"]  # recomputed from the loaded JSON's layer fields
    assert again["first_intruder_epsilon"] == pytest.approx(m["first_intruder_epsilon"])
    assert again["closest_layer"] == m["closest_layer"]
    gap = m["cos_margin"]  # about 0.5
    for flag, value, code in (("--fail-on-margin", gap + 0.01, 4), ("--fail-on-margin", gap - 0.01, 0),
                              ("--fail-on-strength", top * 0.99, 4), ("--fail-on-strength", top * 1.01, 0)):
        res = runner.invoke(cli, ["scan", base, tuned, "-o", str(out), "-q", flag, str(value)])
        assert res.exit_code == code, (flag, value, res.output)
    # intruders present: --fail-on-intruders wins (3), the margin gate alone gives 4
    res = runner.invoke(cli, ["scan", base, synth["tuned_file"], "-o", str(out), "-q",
                              "--fail-on-intruders", "--fail-on-margin", "0"])
    assert res.exit_code == 3
    res = runner.invoke(cli, ["scan", base, synth["tuned_file"], "-o", str(out), "-q",
                              "--fail-on-margin", "0"])
    assert res.exit_code == 4


def test_margin_view_renders(synth, tmp_path):
    from intruder.report.margin_view import margin_rows, margin_scatter, margin_section_html
    from intruder.scan import run_scan

    rep = run_scan(synth["base_file"], synth["tuned_file"])
    rows = margin_rows(rep)
    assert [r[0] for r in rows][0] == "model.layers.1.mlp.up_proj.weight"  # lowest max|cos|
    assert all(r[2] < 0 for r in rows)  # each planted matrix is past the cliff
    fig = margin_scatter(rep)
    assert len(fig.axes[0].collections) == 1  # one class: low-rank updates
    html = margin_section_html(rep)
    assert html.count("<img") == 2 and "lora-like" in html and "<script" not in html


def test_typed_measures_keep_the_json_fields_and_round_trip(synth):
    """Margin / UpdateShape / storage fields are written under the flat per-matrix JSON keys in
    one order, load back to equal dataclasses, and a report without them (schema 1.0) loads
    with None and writes none of them."""
    from dataclasses import replace

    from intruder.report.schema import MEASURE_KEYS, from_dict, layer_measures, to_dict
    from intruder.scan import run_scan
    from intruder.types import Margin, UpdateShape

    rep = run_scan(synth["base_file"], synth["tuned_file"])
    i0, l0 = next((i, l) for i, l in enumerate(rep.layers) if l.status == "scanned")
    assert isinstance(l0.margin, Margin) and isinstance(l0.update_shape, UpdateShape)
    doc = json.loads(json.dumps(to_dict(rep)))  # as read from a file
    lay = doc["layers"][i0]
    keys = [k for k in lay if k in MEASURE_KEYS]
    assert keys == [k for k in MEASURE_KEYS if k in keys]  # the declared order
    assert lay["delta_rank"] == l0.update_shape.rank and lay["delta_sv"] == list(l0.update_shape.sv)
    assert lay["min_max_cos"] == l0.margin.min_max_cos == min(l0.max_cos)
    back = from_dict(doc)
    assert [l.margin for l in back.layers] == [l.margin for l in rep.layers]
    assert [l.update_shape for l in back.layers] == [l.update_shape for l in rep.layers]
    assert json.dumps(to_dict(back)) == json.dumps(doc)
    # storage of a quantized side: two string fields, absent for plain float storage
    q = replace(l0, storage_base="f16", storage_tuned="gguf Q8_0")
    assert list(layer_measures(q))[-2:] == ["storage_base", "storage_tuned"]
    assert "storage_base" not in layer_measures(l0)
    # a 1.0 report (no measures): None, and nothing invented on the way out
    for d in doc["layers"]:
        for k in MEASURE_KEYS:
            d.pop(k, None)
    old = from_dict(doc)
    assert all(l.margin is None and l.update_shape is None for l in old.layers)
    assert not set(MEASURE_KEYS) & set(to_dict(old)["layers"][i0])
