"""The small-block linear algebra of the update measures (intruder/spectral/sketch.py) and the
GPU Gram path, held to float64 numpy references on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from intruder.spectral import margin as M
from intruder.spectral.partial import _gram_blocked, gram, gram_side
from intruder.spectral.sketch import (
    norm_lanczos,
    orth,
    seeded_randn,
    sketch_singular_values,
    sketch_spectrum,
    top_eigenvalue,
)


def test_orth_is_orthonormal_spans_the_input_and_drops_a_deficient_rank():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 20))  # rank 6 in 20 columns
    y += 1e-12 * rng.standard_normal(y.shape)  # rounding-level rest
    q = orth(torch.from_numpy(y), rcond=1e-7).numpy()
    assert q.shape == (400, 6)
    assert np.abs(q.T @ q - np.eye(6)).max() < 1e-13
    resid = y - q @ (q.T @ y)  # nothing of y above the cut is outside span(q)
    assert np.linalg.norm(resid) < 1e-9 * np.linalg.norm(y)
    assert orth(torch.zeros(50, 3, dtype=torch.float64)).shape[1] == 0


@pytest.mark.parametrize("shape", [(120, 80), (60, 200)])
def test_norm_lanczos_and_projected_norm_match_numpy(shape):
    rng = np.random.default_rng(shape[0])
    d = rng.standard_normal(shape) * np.logspace(0, -2, shape[1])  # decaying columns
    ref = np.linalg.norm(d, 2)
    t = torch.from_numpy(d)
    got = norm_lanczos(lambda x: t @ x, lambda y: t.mT @ y, shape[1], t.dtype, t.device,
                       rtol=1e-14)
    assert abs(got - ref) <= 1e-10 * ref
    for left in (True, False):
        k = 5
        b, _ = np.linalg.qr(rng.standard_normal((shape[0] if left else shape[1], k)))
        p = np.eye(b.shape[0]) - b @ b.T
        want = np.linalg.norm(p @ d if left else d @ p, 2)
        got = M.spectral_norm_projected(t, torch.from_numpy(b), left, rtol=1e-13)
        assert got <= want * (1 + 1e-12)  # a lower bound ...
        assert got >= want * (1 - 1e-8)  # ... converged


def test_norm_lanczos_exact_when_the_krylov_space_closes():
    """A rank-2 matrix: the Krylov space is invariant after one block; the answer is exact."""
    rng = np.random.default_rng(5)
    d = rng.standard_normal((90, 2)) @ rng.standard_normal((2, 70))
    t = torch.from_numpy(d)
    got = norm_lanczos(lambda x: t @ x, lambda y: t.mT @ y, 70, t.dtype, t.device, block=4)
    assert abs(got - np.linalg.norm(d, 2)) <= 1e-12 * np.linalg.norm(d, 2)


def test_sketch_singular_values_of_low_rank_plus_noise():
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.standard_normal((500, 12)))
    v, _ = np.linalg.qr(rng.standard_normal((300, 12)))
    s = np.logspace(0, -3, 12)
    d = (u * s) @ v.T + 1e-9 * rng.standard_normal((500, 300))
    ref = np.linalg.svd(d, compute_uv=False)
    got = sketch_singular_values(torch.from_numpy(d), 40).numpy()
    assert got.shape == (40,)
    np.testing.assert_allclose(got[:12], ref[:12], rtol=1e-9)
    assert (got[12:] <= ref[12:40] * (1 + 1e-9) + 1e-15).all()  # Ritz values never exceed


def test_seeded_blocks_are_reproducible_and_reused():
    a = seeded_randn(30, 4, 11, "cpu")
    b = seeded_randn(30, 4, 11, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, seeded_randn(30, 4, 12, "cpu"))
    r1 = seeded_randn(31, 4, 11, "cpu", reuse=True)
    assert seeded_randn(31, 4, 11, "cpu", reuse=True) is r1


@pytest.mark.parametrize("shape", [(2048, 700), (1000, 3000)])
def test_blocked_gram_equals_the_product(shape):
    """The GPU Gram path (upper block triangle, mirrored), run on the CPU: exactly symmetric and
    equal to A A^T within float64 rounding."""
    rng = np.random.default_rng(shape[1])
    a = torch.from_numpy(rng.standard_normal(shape))
    g = _gram_blocked(a, 4)
    ref = a.numpy() @ a.numpy().T
    assert torch.equal(g, g.mT)
    assert np.abs(g.numpy() - ref).max() <= 1e-13 * np.abs(ref).max()


@pytest.mark.parametrize("shape", [(300, 700), (2100, 500), (500, 2100)])
def test_cpu_gram_is_exactly_symmetric(shape):
    """A GEMM's W W^T is symmetric only up to the kernel's summation order (it was not on MKL's
    AVX2 path): gram() symmetrises, by row blocks when large."""
    rng = np.random.default_rng(shape[0])
    w = torch.from_numpy(rng.standard_normal(shape))
    g = gram(w, gram_side(w.shape))
    ref = w.numpy() @ w.numpy().T if shape[0] <= shape[1] else w.numpy().T @ w.numpy()
    assert torch.equal(g, g.mT)
    assert np.abs(g.numpy() - ref).max() <= 1e-13 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rounding_rms_equals_the_definition(dtype):
    """The exponent-histogram rms equals sqrt(mean(ulp^2) / 12) computed element by element with
    frexp, in the stored dtype and after the float64 upcast alike."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((64, 96)) * 0.03).to(dtype)
    bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]
    _, e = torch.frexp(x.double().abs())  # |x| = m 2^e, m in [0.5, 1): floor(log2|x|) = e - 1
    ulp = torch.exp2((e - 1 - bits).double())
    want = math.sqrt(float(ulp.square().mean()) / 12.0)
    assert M.rounding_rms(x, bits) == pytest.approx(want, rel=1e-12)
    assert M.rounding_rms(x.double(), bits) == pytest.approx(want, rel=1e-12)


def _lowrank_plus_noise(rng, m, n, rank=12, noise=1e-6):
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    return (u * np.logspace(0, -2, rank)) @ v.T + noise * rng.standard_normal((m, n))


@pytest.mark.parametrize("shape", [(150, 90), (90, 150)])
@pytest.mark.parametrize("left", [True, False])
def test_projected_norm_through_the_gram_matrix_equals_numpy(shape, left):
    """||P d||_2 from d's Gram matrix on its smaller side (the projector on either side of it)
    equals numpy's 2-norm of the explicitly projected matrix, and the direct Lanczos value."""
    rng = np.random.default_rng(shape[0] + left)
    d = _lowrank_plus_noise(rng, *shape)
    t = torch.from_numpy(d)
    b, _ = np.linalg.qr(rng.standard_normal((shape[0] if left else shape[1], 6)))
    p = np.eye(b.shape[0]) - b @ b.T
    want = np.linalg.norm(p @ d if left else d @ p, 2)
    g = gram(t, gram_side(t.shape))
    via_gram = M.spectral_norm_projected(t, torch.from_numpy(b), left, rtol=1e-13, g=g)
    direct = M.spectral_norm_projected(t, torch.from_numpy(b), left, rtol=1e-13)
    assert abs(via_gram - want) <= 1e-9 * want
    assert abs(via_gram - direct) <= 1e-9 * want


def test_projected_norm_through_the_gram_matrix_when_nothing_is_new():
    """An update inside span(B): the exact answer is 0; through the Gram matrix it is rounding,
    within sqrt(d u) of ||d||_2 (the accuracy the docstring states)."""
    rng = np.random.default_rng(4)
    b, _ = np.linalg.qr(rng.standard_normal((120, 5)))
    d = b @ rng.standard_normal((5, 80))  # (120, 80) columns in span(B)
    t = torch.from_numpy(d)
    got = M.spectral_norm_projected(t, torch.from_numpy(b), True, g=gram(t, gram_side(t.shape)))
    assert got <= math.sqrt(80 * 2.0 ** -53) * np.linalg.norm(d, 2) * 4


def test_lanczos_from_the_sketch_converges_in_fewer_steps_to_the_same_norm():
    """A start block from the sketch's top right singular vectors: the same ||d||_2 (a lower bound,
    converged) in fewer products than a random start; a poor start (orthogonal to the answer)
    still converges."""
    rng = np.random.default_rng(9)
    d = _lowrank_plus_noise(rng, 700, 400, rank=40, noise=1e-3)
    t = torch.from_numpy(d)
    ref = np.linalg.norm(d, 2)
    calls = {"n": 0}

    def fwd(x):
        calls["n"] += 1
        return t @ x

    def run(start):
        calls["n"] = 0
        got = norm_lanczos(fwd, lambda y: t.mT @ y, 400, t.dtype, t.device, rtol=1e-12,
                           start=start)
        return got, calls["n"]

    _, right = sketch_spectrum(t, 60, vectors=4)
    warm, n_warm = run(right)
    cold, n_cold = run(None)
    _, _, vt = np.linalg.svd(d)
    poor, _ = run(torch.from_numpy(vt[5:9].T.copy()))  # spans no top direction
    for got in (warm, cold, poor):
        assert ref * (1 - 1e-10) <= got <= ref * (1 + 1e-12)
    assert n_warm < n_cold, (n_warm, n_cold)


def test_dsyevr_without_the_gil_equals_lapack():
    """The ctypes call of LAPACK's dsyevr (lapack.py) gives scipy's own results, top eigenpairs
    and values only, and leaves its input untouched."""
    import scipy.linalg as sl

    from intruder.spectral.lapack import syevr_top

    rng = np.random.default_rng(11)
    w = rng.standard_normal((300, 200))
    g = w.T @ w
    g0 = g.copy()
    vals, vecs = syevr_top(g, 15)
    ref_vals, ref_vecs = sl.eigh(g, subset_by_index=[185, 199], driver="evr")
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-13)
    assert np.abs(np.abs(np.sum(vecs * ref_vecs, axis=0)) - 1).max() < 1e-10
    np.testing.assert_allclose(syevr_top(g, 200, vectors=False), np.linalg.eigvalsh(g),
                               rtol=1e-10, atol=1e-10 * np.abs(g).max())
    assert np.array_equal(g, g0)


@pytest.mark.parametrize("d", [64, 300, 900])
def test_top_eigenvalue_on_the_device_matches_lapack_from_below(d):
    # the inverse Gram of a power-law spectrum (what slices.inverse_gram estimates): its top
    # eigenvalues crowd (1 / the smallest of the base), the hard case for a Krylov method
    rng = np.random.default_rng(d)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.arange(1, d + 1) ** -1.2 * (1 + 0.02 * rng.random(d))
    h = (u / lam**2) @ u.T
    h = (h + h.T) / 2
    true = np.linalg.eigvalsh(h)[-1]
    ht = torch.from_numpy(h)
    got = top_eigenvalue(lambda x: ht @ x, d, ht.dtype, ht.device, block=4, steps=24, seed=7)
    assert got is not None
    assert got <= true * (1 + 1e-12)  # Ritz values of an orthonormal basis: from below
    assert got >= true * (1 - 1e-3)  # and close: the fence (1.01 x) then holds at once
    # a closing Krylov space (rank-2 operator) is exact, not a breakdown
    v = np.linalg.qr(rng.standard_normal((d, 2)))[0]
    low = torch.from_numpy((v * np.array([3.0, 1.0])) @ v.T)
    got2 = top_eigenvalue(lambda x: low @ x, d, low.dtype, low.device, steps=6)
    assert got2 is not None and abs(got2 - 3.0) < 1e-9
