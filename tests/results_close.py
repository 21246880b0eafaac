"""Comparing two scans of the same inputs made along different code paths (threads, devices,
BLAS kernels, a warm cache): the same decisions exactly, the numbers within a tolerance that
holds on any IEEE machine. Last bits are never compared: MKL's AVX2 and AVX-512 kernels,
cuBLAS and different thread counts sum in different orders."""

from __future__ import annotations

import numpy as np

# The certified and exact paths resolve max|cos| to ~1e-13 (tests/test_engine_fast.py); two
# roundings of the same computation differ far less than this, a wrong spectrum far more.
COS_TOL = 1e-9
SIGMA_RTOL = 1e-9

_VECTORS = ("max_cos", "near_overlap", "top_overlap", "max_cos_right")
_SIGMAS = ("sigma_base", "sigma_tuned")
_EXACT = ("status", "base_index", "base_index_right", "counts_by_epsilon")


def _get(layer, key):
    v = layer.get(key) if isinstance(layer, dict) else getattr(layer, key, None)
    if key == "counts_by_epsilon" and v is not None:  # JSON: lists or a dict
        v = sorted((float(e), int(c)) for e, c in (v.items() if isinstance(v, dict) else v))
    if key == "intruders" and v is not None:
        v = [i["index"] if isinstance(i, dict) else i.index for i in v]
    return v


def assert_layer_close(a, b, what: str = "") -> None:
    """a, b: LayerResult objects or report JSON layer dicts of one matrix."""
    for key in _EXACT + ("intruders",):
        va, vb = _get(a, key), _get(b, key)
        if key in ("base_index", "base_index_right", "counts_by_epsilon", "intruders"):
            va, vb = list(va or []), list(vb or [])
        assert va == vb, (what, key, va, vb)
    for key in _VECTORS:
        va, vb = np.asarray(_get(a, key) or [], float), np.asarray(_get(b, key) or [], float)
        assert va.shape == vb.shape, (what, key)
        if va.size:
            err = np.abs(va - vb).max()
            assert err <= COS_TOL, (what, key, err)
    for key in _SIGMAS:
        va, vb = np.asarray(_get(a, key) or [], float), np.asarray(_get(b, key) or [], float)
        assert va.shape == vb.shape, (what, key)
        np.testing.assert_allclose(va, vb, rtol=SIGMA_RTOL, atol=0, err_msg=f"{what} {key}")


def assert_scans_close(a: dict, b: dict) -> None:
    """Two {name: layer} maps of one pair of checkpoints."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert_layer_close(a[name], b[name], name)
