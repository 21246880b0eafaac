"""Silent wrong results of the numerical side, each held to what must happen: the base cache
against a file replaced while it is read and against flipped bits, and float64 weights whose
squares leave float64's range (against numpy's LAPACK SVD, which never squares). The
environment variables' checks are in tests/test_settings.py."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading

import numpy as np
import pytest
import synthetic
import torch
from click.testing import CliRunner
from results_close import assert_scans_close

import intruder.run.cache as C
from intruder.cli import cli
from intruder.io import open_checkpoint, read_ref
from intruder.run import stream
from intruder.run.cache import BaseCache, content_key
from intruder.spectral.decompose import full_spectrum, spectral_norm, top_spectrum
from intruder.spectral.engine import analyse
from intruder.spectral.reference import reference_intruders
from intruder.types import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = 1_000_000_000  # an mtime far in the past: files are indexed at once


def _scan(base, tuned, out, *extra, may_fail=False):
    res = CliRunner().invoke(cli, ["scan", base, tuned, "-q", "-o", out, *extra])
    if may_fail and res.exit_code == 1:  # one line, and no report
        assert res.output.strip().count("\n") == 0 and "changed on disk" in res.output
        assert not os.path.exists(out)
        return None
    assert res.exit_code in (0, 3), res.output
    with open(out) as fh:
        return {l["name"]: l for l in json.load(fh)["layers"]}


def _scaled_copy(src, dst, factor):
    from safetensors.torch import load_file, save_file

    save_file({k: v * factor for k, v in load_file(src).items()}, dst)


# -- the cache against a base replaced while it is read -----------------------------------------

def test_base_replaced_while_read_is_not_remembered(synth, tmp_path, monkeypatch):
    """`cp -p new base.tmp && mv base.tmp base` between the read of a base tensor and the cache's
    look at the file: the new file keeps the old mtime. The index must not map the new file to
    the old bytes' key; later cached scans of the new file equal --no-cache scans of it."""
    base = str(tmp_path / "base.safetensors")
    shutil.copy(synth["base_file"], base)
    os.utime(base, (OLD, OLD))
    other = str(tmp_path / "other.safetensors")
    _scaled_copy(synth["base_file"], other, 1.5)  # same layout, other bytes
    cache = str(tmp_path / "cache")
    swapped = []
    real_read = stream.Reader.read
    once = threading.Lock()  # reader threads run this concurrently: one of them swaps, once

    def read_then_swap(self, ref):
        out = real_read(self, ref)
        with once:
            if ref.path == base and not swapped:  # the replacement lands right after this read
                tmp = base + ".tmp"
                shutil.copy(other, tmp)
                os.utime(tmp, (OLD, OLD))
                os.replace(tmp, base)
                swapped.append(ref.name)
        return out

    monkeypatch.setattr(stream.Reader, "read", read_then_swap)
    # the scan itself stops at its next read of the replaced file (its header is another's)
    _scan(base, synth["tuned_file"], str(tmp_path / "a.json"), "--cache-dir", cache, may_fail=True)
    monkeypatch.setattr(stream.Reader, "read", real_read)
    assert swapped
    ck = open_checkpoint(base)
    ref = ck.refs[swapped[0]]
    now_bytes = read_ref(ref, {})
    key = BaseCache(cache).known_key(ref)
    assert key in (None, content_key(now_bytes, ref))  # never the replaced bytes' key
    warm = _scan(base, synth["tuned_file"], str(tmp_path / "w.json"), "--cache-dir", cache)
    cold = _scan(base, synth["tuned_file"], str(tmp_path / "n.json"), "--no-cache")
    assert_scans_close(warm, cold)


def test_key_for_hashes_when_the_identity_changed(synth, tmp_path):
    base = str(tmp_path / "base.safetensors")
    shutil.copy(synth["base_file"], base)
    os.utime(base, (OLD, OLD))
    ref = next(r for r in open_checkpoint(base).refs.values() if len(r.shape) == 2)
    c = BaseCache(str(tmp_path / "cache"))
    before = c.identity(ref)
    t = read_ref(ref, {})
    os.utime(base, (OLD + 5, OLD + 5))  # touched after the read
    assert c.key_for(ref, t, before) == content_key(t, ref)
    assert c.known_key(ref) is None  # nothing remembered
    before = c.identity(ref)
    assert c.key_for(ref, t, before) == content_key(t, ref)
    assert c.known_key(ref) == content_key(t, ref)  # unchanged during the read: remembered


# -- integrity of entries and index files ------------------------------------------------------

def _entry_file(cache, key):
    return os.path.join(cache, C.SPECTRA, key + ".safetensors")


def _data_offset(path, name):
    """Absolute offset of tensor `name`'s first byte in a safetensors file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return 8 + n + header[name]["data_offsets"][0], header


def _flip(path, offset, mask):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ mask]))


@pytest.mark.parametrize("where", ["vector sign", "singular value", "metadata"])
def test_flipped_bit_in_an_entry_is_a_miss_and_is_rewritten(synth, tmp_path, where):
    """A sign bit flipped in a cached vector keeps it a unit vector (the old norm check passed
    it); a bit in vals changes sigma_base; the metadata holds the fence `rest`. Each is caught
    by the entry's checksum: a miss, recomputed, rewritten, and the scan is unchanged."""
    cache = str(tmp_path / "cache")
    env_base, tuned = synth["base_file"], synth["tuned_file"]
    cold = _scan(env_base, tuned, str(tmp_path / "c.json"), "--cache-dir", cache)
    c = BaseCache(cache)
    key = c.entries()[0]["key"]
    path = _entry_file(cache, key)
    if where == "vector sign":
        off, _ = _data_offset(path, "vecs")
        _flip(path, off + 7, 0x80)  # sign of the first float64 (little-endian: last byte)
    elif where == "singular value":
        off, _ = _data_offset(path, "vals")
        _flip(path, off + 3, 0x10)
    else:
        with open(path, "rb") as fh:
            raw = fh.read()
        i = raw.index(b'"rest":"') + len(b'"rest":"')
        digit = raw[i:i + 1]
        new = b"1" if digit != b"1" else b"2"
        with open(path, "r+b") as fh:
            fh.seek(i)
            fh.write(new)
    assert c.load(key) is None
    again = _scan(env_base, tuned, str(tmp_path / "a.json"), "--cache-dir", cache)
    assert_scans_close(again, cold)
    assert BaseCache(cache).load(key) is not None  # rewritten


def test_tampered_index_file_is_ignored(synth, tmp_path):
    base = str(tmp_path / "base.safetensors")
    shutil.copy(synth["base_file"], base)
    os.utime(base, (OLD, OLD))
    cache = str(tmp_path / "cache")
    cold = _scan(base, synth["tuned_file"], str(tmp_path / "c.json"), "--cache-dir", cache)
    idx = os.path.join(cache, C.INDEX)
    (name,) = os.listdir(idx)
    with open(os.path.join(idx, name)) as fh:
        doc = json.load(fh)
    victim = sorted(doc["tensors"])[0]
    other = sorted(doc["tensors"])[1]
    doc["tensors"][victim][2] = doc["tensors"][other][2]  # points at another tensor's spectrum
    with open(os.path.join(idx, name), "w") as fh:
        json.dump(doc, fh)
    ref = open_checkpoint(base).refs[victim]
    assert BaseCache(cache).known_key(ref) is None
    warm = _scan(base, synth["tuned_file"], str(tmp_path / "w.json"), "--cache-dir", cache)
    assert_scans_close(warm, cold)


# -- float64 weights whose squares leave float64's range ---------------------------------------

@pytest.mark.parametrize("scale", [1e-165, 1e-300, 1e200])
@pytest.mark.parametrize("shape,exact_dim", [((128, 96), None), ((320, 288), None)])
def test_extreme_float64_scales_match_lapack(monkeypatch, scale, shape, exact_dim):
    """Planted intruders at ranks 1 and 4 in weights of size ~1e-165 (squares underflow: every
    Gram eigenvalue was 0) or ~1e200 (squares overflow): same decisions and max|cos| as numpy's
    LAPACK SVD, sigmas to 1e-9, on the exact and the certified path; the update measures in the
    same units."""
    if exact_dim:
        monkeypatch.setenv("INTRUDER_EXACT_DIM", exact_dim)
    w0, wt, _ = synthetic.plant(*shape, ranks=[1, 4], seed=11)
    a, b = w0 * scale, wt * scale
    fields, be = analyse(torch.from_numpy(a), torch.from_numpy(b), ScanConfig())
    ref = reference_intruders(a, b, 10, 0.5)
    assert [i.index for i in fields.intruders] == [1, 4] == list(np.nonzero(ref.intruders)[0])
    assert np.abs(np.array(fields.max_cos) - ref.max_cos).max() < 1e-8
    np.testing.assert_allclose(fields.sigma_tuned, ref.sigma_tuned, rtol=1e-9)
    np.testing.assert_allclose(fields.sigma_base, ref.sigma_base[:15], rtol=1e-9)
    for i in fields.intruders:
        assert i.sigma == pytest.approx(ref.sigma_tuned[i.index], rel=1e-9)
    unit, _ = analyse(torch.from_numpy(w0), torch.from_numpy(wt), ScanConfig())
    assert fields.delta_norm_rel == pytest.approx(unit.delta_norm_rel, rel=1e-9)
    assert fields.intruder_energy == pytest.approx(unit.intruder_energy, rel=1e-9)
    ex, ux = fields.update_shape, unit.update_shape
    assert ex is not None and ux is not None and fields.margin and unit.margin
    assert ex.rank == ux.rank == 2  # the planted rank-2 update; below: noise
    np.testing.assert_allclose(np.array(ex.sv[:2]) / scale, ux.sv[:2], rtol=1e-8)
    assert ex.floor / scale == pytest.approx(ux.floor, rel=1e-6)
    assert fields.margin.novel_strength == pytest.approx(unit.margin.novel_strength, rel=1e-8)
    # the base spectrum carries its scale: passed back (as the cache does) it gives the same
    again, _ = analyse(torch.from_numpy(a), torch.from_numpy(b), ScanConfig(), base_spec=be)
    assert [i.index for i in again.intruders] == [1, 4]
    assert np.abs(np.array(again.max_cos) - ref.max_cos).max() < 1e-8


@pytest.mark.parametrize("scale", [1e-165, 1e200])
def test_decompositions_at_extreme_scales(scale):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((90, 60)) * scale
    s_ref = np.linalg.svd(w, compute_uv=False)
    t = torch.from_numpy(w)
    np.testing.assert_allclose(full_spectrum(t).sigma.numpy(), s_ref, rtol=1e-9)
    top = top_spectrum(t, 5, left=True, right=True)
    np.testing.assert_allclose(top.sigma.numpy(), s_ref[:5], rtol=1e-10)
    recon = (top.u * top.sigma) @ top.v.T  # rank-5 part, in the units of w
    assert np.isfinite(recon.numpy()).all() and float(recon.abs().max()) > 0
    assert spectral_norm(t) == pytest.approx(s_ref[0], rel=1e-10)


def test_cache_round_trip_keeps_the_scale(tmp_path):
    w0, wt, _ = synthetic.plant(128, 96, ranks=[2], seed=3)
    a, b = torch.from_numpy(w0 * 1e-165), torch.from_numpy(wt * 1e-165)
    fields, be = analyse(a, b, ScanConfig())
    assert be.scale != 1.0
    c = BaseCache(str(tmp_path / "cache"))
    c.store("c" * 64, be, wait=True)
    back = c.load("c" * 64)
    assert back.scale == be.scale and torch.equal(back.vals, be.vals)
    warm, _ = analyse(a, b, ScanConfig(), base_spec=back)
    assert [i.index for i in warm.intruders] == [i.index for i in fields.intruders] == [2]
    np.testing.assert_allclose(warm.sigma_base, fields.sigma_base, rtol=1e-12)
