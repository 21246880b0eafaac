"""The fast engine: certified partial decompositions against float64 LAPACK on fresh random
inputs, fast path == exact path, the pipeline (threads, several devices, order of errors) ==
per-matrix analysis, the base spectral cache (cold == warm, invalidation, damage), torchrun."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from results_close import assert_layer_close, assert_scans_close

import intruder.run.cache as C
import intruder.spectral.engine as E
from intruder.cli import cli
from intruder.errors import IntruderError, NonFiniteError
from intruder.run import devices, multi
from intruder.run.cache import BaseCache
from intruder.run.load import load_pair
from intruder.run.stream import Pipeline
from intruder.spectral.certify import certify_side
from intruder.spectral.decompose import spectral_norm
from intruder.spectral.engine import analyse
from intruder.spectral.partial import eig_top, gram, gram_error
from intruder.spectral.reference import reference_intruders
from intruder.types import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh():
    seed = secrets.randbits(32)
    return seed, np.random.default_rng(seed)


def _spectrum_pair(m, n, rng, strength, alpha=0.5, rank=16):
    """Power-law base (2% jitter) plus a LoRA-like update of ||dW|| = strength * sigma_10."""
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))  # (m, r)
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))  # (n, r)
    s = np.sort(np.abs(np.arange(1, r + 1) ** -alpha * (1 + 0.02 * rng.standard_normal(r))))[::-1]
    w0 = (u * s) @ v.T
    d = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    wt = w0 + d * (strength * s[9] / np.linalg.norm(d, 2))
    return torch.from_numpy(w0).to(torch.bfloat16), torch.from_numpy(wt).to(torch.bfloat16)


@pytest.mark.parametrize("route", ["lapack", "iterative"])
@pytest.mark.parametrize("shape", [(320, 320), (448, 320), (320, 448)])
@pytest.mark.parametrize("strength", [0.2, 3.0])
def test_fast_path_matches_float64_lapack(monkeypatch, shape, strength, route):
    """Gram > 256: partial base + certified tuned top-k; against numpy's float64 SVD: max|cos|
    within the guaranteed 3e-5 (observed ~1e-13), identical decisions, sigma to 1e-9. Both
    routes: LAPACK on an index range (a CPU's) and Chebyshev iteration (a GPU's, run here)."""
    if route == "iterative":
        monkeypatch.setattr(E, "LAPACK_ON_CPU", False)
    seed, rng = _fresh()
    w0, wt = _spectrum_pair(*shape, rng, strength)
    fields, base = analyse(w0, wt, ScanConfig(epsilons=(0.5, 0.7, 0.9)), "m")
    ref = reference_intruders(w0.double().numpy(), wt.double().numpy(), 10, 0.5)
    ours = np.array(fields.max_cos)
    assert np.abs(ours - ref.max_cos).max() <= 3e-5, seed
    away = np.abs(ref.max_cos - 0.5) > 1e-4
    assert ((ours < 0.5)[away] == ref.intruders[away]).all(), seed
    np.testing.assert_allclose(fields.sigma_tuned, ref.sigma_tuned, rtol=1e-9, err_msg=str(seed))
    np.testing.assert_allclose(fields.sigma_base, ref.sigma_base[:15], rtol=1e-9, err_msg=str(seed))
    tuned_method = "evr64" if route == "lapack" else "cheb64"
    assert fields.method.split("/")[1] == tuned_method, (seed, fields.method)
    if strength < 1:  # a mild update: the kept base vectors prove the answer
        assert "[top" in fields.method, (seed, fields.method)
        assert not base.complete and base.r >= 25


@pytest.mark.parametrize("shape", [(320, 320), (448, 320), (320, 448)])
def test_cpu_route_takes_the_complete_base_at_once_for_new_directions(monkeypatch, shape):
    """On a CPU the tuned side comes first; when one of its top vectors lies mostly outside
    what the base sees (planted new directions), the base is decomposed completely at once,
    with no top-R attempt that the certificate would refuse; a mild update keeps the top-R
    route. Either way the answer is numpy's float64 one."""
    calls = []
    real = E.eig_top_lapack
    monkeypatch.setattr(E, "eig_top_lapack", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    seed, rng = _fresh()
    m, n = shape
    w0, _ = _spectrum_pair(m, n, rng, 0.0)
    s = np.linalg.svd(w0.double().numpy(), compute_uv=False)
    b = rng.standard_normal((m, 3))
    a = rng.standard_normal((3, n))
    planted = (b / np.linalg.norm(b, axis=0) * s[[1, 4, 7]]) @ (a / np.linalg.norm(a, axis=1,
                                                                                   keepdims=True))
    for wt, complete in ((w0.double() + torch.from_numpy(planted), True),
                         (_spectrum_pair(m, n, np.random.default_rng(seed), 0.2)[1], False)):
        calls.clear()
        fields, base = analyse(w0, wt.to(torch.bfloat16), ScanConfig(), "m")
        assert base.complete == complete, (seed, fields.method)
        assert calls == ([10] if complete else [10, 32]), (seed, calls)  # tuned (k), base (R)
        ref = reference_intruders(w0.double().numpy(), wt.to(torch.bfloat16).double().numpy(),
                                  10, 0.5)
        assert np.abs(np.array(fields.max_cos) - ref.max_cos).max() <= 3e-5, seed


@pytest.mark.parametrize("vectors", ["left", "right", "both"])
def test_fast_path_equals_exact_path(monkeypatch, vectors):
    """Every field of the report from the fast path equals the exact path's (full float64 Gram
    eigendecomposition) to rounding; integer fields exactly."""
    seed, rng = _fresh()
    w0, wt = _spectrum_pair(416, 352, rng, 0.3)
    cfg = ScanConfig(vectors=vectors, epsilons=(0.5, 0.9))
    fast, _ = analyse(w0, wt, cfg, "m")
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "100000")
    exact, be = analyse(w0, wt, cfg, "m")
    assert be.complete and "[top" not in exact.method
    for key in ("max_cos", "near_overlap", "top_overlap", "sigma_base", "sigma_tuned",
                "max_cos_right"):
        np.testing.assert_allclose(getattr(fast, key), getattr(exact, key), rtol=1e-9, atol=1e-9,
                                   err_msg=f"{key} {seed}")
    for key in ("base_index", "base_index_right", "counts_by_epsilon"):
        assert getattr(fast, key) == getattr(exact, key), (key, seed)
    assert [i.index for i in fast.intruders] == [i.index for i in exact.intruders]
    assert fast.delta_norm_rel == pytest.approx(exact.delta_norm_rel, rel=1e-10)


def test_eig_top_certificate_bounds_hold():
    """Known spectrum Q diag(l) Q^T: values to 1e-12, each vector's true angle below its bound,
    and the fence above every eigenvalue left out; an adversarial start block (orthogonal to the
    top eigenvector) cannot hide it."""
    seed, rng = _fresh()
    d = 400
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.sort(np.arange(1, d + 1) ** -1.0 * (1 + 0.01 * rng.standard_normal(d)))[::-1]
    g = torch.from_numpy((q * lam) @ q.T)
    g = (g + g.mT) / 2
    start = torch.from_numpy(q[:, 1:20].copy())  # misses eigenvector 0 on purpose
    e = eig_top(g, 20, start=start, seed=seed)
    assert e is not None, seed
    np.testing.assert_allclose(e.vals.numpy(), lam[:20], rtol=1e-12, err_msg=str(seed))
    x, qq = e.vecs.numpy(), q[:, :20]
    perp = x - qq * np.sum(x * qq, axis=0)  # (d, 20) part of each vector off its eigenvector
    sin = np.linalg.norm(perp, axis=0)  # accurate to ~1e-16 (unlike sqrt(1 - cos^2))
    assert (sin <= e.err.numpy() + 1e-14).all(), (seed, sin.max(), e.err.min())
    assert lam[20] <= e.rest < lam[19]


def test_eig_top_refuses_a_degenerate_pair():
    """Two equal eigenvalues among the wanted: no single vector can be certified, so the exact
    path must run (None), never a silently arbitrary vector."""
    rng = np.random.default_rng(3)
    d = 300
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = 1.0 / np.arange(1, d + 1)
    lam[5] = lam[4]
    g = torch.from_numpy((q * lam) @ q.T)
    assert eig_top((g + g.mT) / 2, 12) is None


def test_match_outside_the_kept_base_vectors_is_caught():
    """A tuned top vector that IS base vector 150: matching against the top 32 alone would say
    intruder; the certificate refuses, the engine completes the base and finds cos 1 at 150."""
    seed, rng = _fresh()
    m = n = 320
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 10.0 / np.arange(1, m + 1) ** 0.5
    w0 = (u * s) @ v.T
    wt = w0 + 20.0 * np.outer(u[:, 150], v[:, 150])  # sigma_150 lifted to the top
    t0, tt = torch.from_numpy(w0), torch.from_numpy(wt)
    fields, base = analyse(t0, tt, ScanConfig(), "m")
    assert fields.base_index[0] == 150 and fields.max_cos[0] == pytest.approx(1.0, abs=1e-9)
    assert fields.intruders == ()
    ref = reference_intruders(w0, wt, 10, 0.5)
    assert np.abs(np.array(fields.max_cos) - ref.max_cos).max() < 1e-9, seed
    # and the certificate itself, on the top-32 base alone, says no
    g = gram(t0, "left")
    b32 = eig_top(g, 32, eps_g=gram_error(t0, g))
    gt = gram(tt, "left")
    t10 = eig_top(gt, 10, eps_g=gram_error(tt, gt))
    why = certify_side(t10.vecs, t10.vals.sqrt(), t10.err, b32.vecs, b32.err, b32.rest ** 0.5,
                       False, m, 0.1, 20, 10)
    assert why.startswith("full")


def test_spectral_norm_block_lanczos():
    rng = np.random.default_rng(0)
    for d in (rng.standard_normal((300, 3)) @ rng.standard_normal((3, 200)),
              rng.standard_normal((250, 180)), np.zeros((5, 4)),
              rng.standard_normal((400, 16)) @ rng.standard_normal((16, 300)) * 1e-2
              + 1e-4 * rng.standard_normal((400, 300))):
        ref = np.linalg.norm(d, 2)
        assert abs(spectral_norm(torch.from_numpy(d)) - ref) <= 1e-10 * max(ref, 1e-300)


# -- pipeline ---------------------------------------------------------------------------------

def _pairs(path_b, path_t, **kw):
    from intruder.io import open_checkpoint, pair_checkpoints, read_ref

    handles = {}
    pairs = list(pair_checkpoints(open_checkpoint(path_b), open_checkpoint(path_t), **kw).pairs)
    return pairs, (lambda ref: read_ref(ref, handles))


def test_pipeline_threads_and_devices_equal_per_matrix(synth):
    """Two fake devices x two worker threads with a one-pair host budget: same results, same
    order, as loading and analysing each pair alone."""
    pairs, read = _pairs(synth["base_file"], synth["tuned_sharded"])
    cfg = ScanConfig(epsilons=(0.5, 0.9))
    cpu = torch.device("cpu")
    got = list(Pipeline(pairs, read, cfg, [cpu, cpu], threaded=True, per_device=2, budget=1))
    assert [r.name for r in got] == [p.name for p in pairs]
    for p, r in zip(pairs, got):
        loaded = load_pair(p, read, False)
        assert r.status == loaded.status
        if loaded.status == "scanned":  # other threads, other BLAS thread counts: not last bits
            fields, _ = analyse(loaded.w0, loaded.wt, cfg, p.name)
            assert_layer_close(r, fields.layer(p.name, r.shape, r.dtype), p.name)


def _nan_copy(src, dst, name):
    from safetensors.torch import load_file, save_file

    t = load_file(src)
    bad = t[name].clone()
    bad[1, 2] = float("nan")
    t[name] = bad
    save_file(t, dst)


@pytest.mark.parametrize("threaded", [False, True])
def test_pipeline_raises_the_first_bad_pair_in_order(synth, tmp_path, threaded):
    from safetensors import safe_open

    with safe_open(synth["tuned_file"], framework="pt") as f:
        names = sorted(n for n in f.keys() if n.endswith("proj.weight"))
    bad = names[len(names) // 2]
    dst = str(tmp_path / "tuned.safetensors")
    _nan_copy(synth["tuned_file"], dst, bad)
    pairs, read = _pairs(synth["base_file"], dst)
    cpu = torch.device("cpu")
    seen = []
    with pytest.raises(NonFiniteError) as exc:
        for r in Pipeline(pairs, read, ScanConfig(), [cpu, cpu], threaded=threaded):
            seen.append(r.name)
    assert f"tuned tensor {bad!r} in {dst} contains NaN" in str(exc.value)
    assert seen == [p.name for p in pairs][: [p.name for p in pairs].index(bad)]
    res = list(Pipeline(pairs, read, ScanConfig(allow_nonfinite=True), [cpu], threaded=threaded))
    assert {r.name: r.status for r in res}[bad] == "nonfinite"


# -- base spectral cache ----------------------------------------------------------------------

def _scan_json(runner, base, tuned, out, *extra):
    res = runner.invoke(cli, ["scan", base, tuned, "-q", "-o", out, *extra])
    assert res.exit_code in (0, 3), res.output
    with open(out) as fh:
        return {l["name"]: l for l in json.load(fh)["layers"]}


def test_cache_warm_equals_cold_and_invalidates(synth, tmp_path, monkeypatch):
    """Warm (base spectra from the cache), cold and uncached scans decide the same and agree to
    rounding; a changed base tensor is a miss (its old spectrum would be far off)."""
    monkeypatch.setenv("INTRUDER_EXACT_DIM", "64")  # the synthetic matrices take the fast path
    import shutil

    base = str(tmp_path / "base.safetensors")
    shutil.copy(synth["base_file"], base)
    os.utime(base, (1_000_000_000, 1_000_000_000))  # old enough to be indexed
    cache = str(tmp_path / "cache")
    r = CliRunner()
    cold = _scan_json(r, base, synth["tuned_file"], str(tmp_path / "c.json"), "--cache-dir", cache)
    c = BaseCache(cache)
    n_entries = len(c.entries())
    assert n_entries == sum(1 for l in cold.values() if l["status"] == "scanned")
    warm = _scan_json(r, base, synth["tuned_file"], str(tmp_path / "w.json"), "--cache-dir", cache)
    assert_scans_close(warm, cold)
    assert BaseCache(cache).entries() and all(e["kept"] for e in BaseCache(cache).entries())
    none = _scan_json(r, base, synth["tuned_file"], str(tmp_path / "n.json"), "--no-cache")
    assert_scans_close(none, cold)
    # the index knows every base tensor's key now: a warm scan hashes nothing
    from intruder.io import open_checkpoint

    ck = open_checkpoint(base)
    assert all(c.known_key(ref) for ref in ck.refs.values() if ref.name in cold
               and cold[ref.name]["status"] == "scanned")
    # change one scanned base tensor in place: its key changes, the cached spectrum is not used
    from safetensors.torch import load_file, save_file

    name = next(n for n, l in cold.items() if l["status"] == "scanned")
    t = load_file(base)
    t[name] = t[name] * 1.5
    save_file(t, base)
    assert c.known_key(ck.refs[name]) is None  # new identity: hashed again
    fresh = _scan_json(r, base, synth["tuned_file"], str(tmp_path / "f.json"), "--cache-dir", cache)
    nc = _scan_json(r, base, synth["tuned_file"], str(tmp_path / "g.json"), "--no-cache")
    assert_scans_close(fresh, nc)
    assert fresh[name]["sigma_base"][0] == pytest.approx(1.5 * cold[name]["sigma_base"][0], rel=1e-9)
    assert len(BaseCache(cache).entries()) == n_entries + 1
    assert not [f for d, _, fs in os.walk(cache) for f in fs if f.startswith(".")]  # no temporaries


def test_cache_damaged_entry_is_a_miss_and_is_rewritten(synth, tmp_path):
    cache = str(tmp_path / "cache")
    r = CliRunner()
    cold = _scan_json(r, synth["base_file"], synth["tuned_file"], str(tmp_path / "c.json"),
                      "--cache-dir", cache)
    c = BaseCache(cache)
    entry = c.entries()[0]
    path = os.path.join(cache, C.SPECTRA, entry["key"] + ".safetensors")
    with open(path, "r+b") as fh:
        fh.truncate(100)
    assert c.load(entry["key"]) is None
    again = _scan_json(r, synth["base_file"], synth["tuned_file"], str(tmp_path / "a.json"),
                       "--cache-dir", cache)
    assert_scans_close(again, cold)
    assert BaseCache(cache).load(entry["key"]) is not None


def test_cache_entry_round_trip_in_blocks_and_garbage_vectors_are_a_miss(tmp_path, monkeypatch):
    """Entries are streamed in row blocks (here 1 KB): what comes back is bit-identical; an
    entry whose vectors are not unit columns (a torn or racy write) is refused, not trusted."""
    import intruder.run.cache as C
    from intruder.spectral.partial import Eig

    monkeypatch.setattr(C, "WRITE_BLOCK", 1000)
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(300, 7, generator=g, dtype=torch.float64))  # (300, 7)
    o, _ = torch.linalg.qr(torch.randn(90, 7, generator=g, dtype=torch.float64))  # (90, 7)
    e = Eig(torch.rand(7, generator=g, dtype=torch.float64), q, torch.zeros(7, dtype=torch.float64),
            0.25, False, "left", "cheb64", o)
    c = BaseCache(str(tmp_path / "cache"))
    c.store("a" * 64, e)
    bad = Eig(e.vals, q * 0.5, e.err, e.rest, e.complete, e.side, e.method)
    c.store("b" * 64, bad)
    assert c.flush() == []
    back = c.load("a" * 64)
    assert torch.equal(back.vecs, q) and torch.equal(back.other, o) and torch.equal(back.vals, e.vals)
    assert back.rest == 0.25 and back.side == "left" and not back.complete
    assert c.load("b" * 64) is None


def test_cache_cli_list_and_clear(synth, tmp_path):
    cache = str(tmp_path / "cache")
    r = CliRunner()
    _scan_json(r, synth["base_file"], synth["tuned_file"], str(tmp_path / "c.json"), "--cache-dir", cache)
    res = r.invoke(cli, ["cache", "list", "--cache-dir", cache, "--json"])
    doc = json.loads(res.output)
    assert res.exit_code == 0 and doc["entries"] and doc["bytes"] > 0
    assert {e["tensor"] for e in doc["entries"]} <= set(json.load(open(tmp_path / "c.json"))
                                                        ["layers"][i]["name"] for i in range(14))
    res = r.invoke(cli, ["cache", "list", "--cache-dir", cache])
    assert "singular vectors kept" in res.output and "of at most" in res.output
    res = r.invoke(cli, ["cache", "clear", "--cache-dir", cache])
    assert res.exit_code == 0 and res.output.startswith("removed ")
    assert BaseCache(cache).entries() == []


def test_cache_is_on_by_default_in_the_user_cache_dir(synth, tmp_path, monkeypatch):
    monkeypatch.delenv("INTRUDER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _scan_json(CliRunner(), synth["base_file"], synth["tuned_file"], str(tmp_path / "c.json"))
    assert BaseCache(str(tmp_path / "xdg" / "intruder")).entries()


# -- several devices / processes --------------------------------------------------------------

def test_shard_covers_every_matrix_once_balanced():
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 3 + [(1024, 4096)] * 2
    parts = multi.shard(shapes, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(shapes)))
    loads = [sum(multi.cost(shapes[i]) for i in p) for p in parts]
    assert max(loads) <= 1.5 * min(loads)


def test_resolve_devices_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert devices.resolve_devices("cpu") == [torch.device("cpu")]
    assert devices.resolve_devices("auto") == [torch.device("cpu")]
    with pytest.raises(IntruderError, match="CUDA is not available"):
        devices.resolve_devices("cuda:0,1")


def test_torchrun_two_ranks_equal_one_process(synth, tmp_path):
    """torchrun --nproc-per-node 2 -m intruder scan: rank 0 writes the report, identical to a
    single-process scan (gloo on the CPU here; the same code path as on GPUs)."""
    out1, out2 = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    args = ["scan", synth["base_file"], synth["tuned_file"], "-q", "--no-cache", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "intruder", *args, "-o", out1], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", "-m", "intruder", *args, "-o", out2], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 3), p.stderr[-2000:]
    a, b = json.load(open(out1)), json.load(open(out2))
    assert [l["name"] for l in a["layers"]] == [l["name"] for l in b["layers"]]
    for la, lb in zip(a["layers"], b["layers"]):
        assert_layer_close(la, lb, la["name"])
    assert p.stdout.count("matrices scanned") == 1  # rank 0 alone prints the table
