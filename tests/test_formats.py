"""Every safetensors dtype, FP8 / int8 layouts decoded before analysis, GGUF as base or tuned.

The demo models (fixtures/demo) are converted by fixtures/quantize_demo.py into a temporary
directory once per module; scans of the converted files are held to scans of the originals.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
import quantize_demo as qd
import torch
from click.testing import CliRunner

from intruder.cli import cli
from intruder.errors import CheckpointError
from intruder.io import dequant, open_checkpoint, pair_checkpoints, read_ref
from intruder.io.safetensors_file import DTYPES, PACKED_BITS, SafetensorsFile
from intruder.report.summary import summary
from intruder.scan import run_scan
from intruder.types import ScanConfig

gguf = pytest.importorskip("gguf")
from intruder.io import gguf as ggufio  # noqa: E402  (after the importorskip)

DEMO = os.path.join(qd.MODELS)
CFG = ScanConfig(cache_dir=None, device="cpu")
EPS = 0.5
# measured on the demo fine-tunes (fixtures/quantize_demo.py): max |max_cos difference| against
# the original over every top-10 vector of 28 matrices x 3 fine-tunes: FP8 E4M3 per-channel
# 0.214, GGUF Q8_0 0.029. A decision may differ only for a vector closer than this to epsilon.
TOL_FP8 = 0.25
TOL_Q8 = 0.05


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    out = tmp_path_factory.mktemp("formats")
    paths = {}
    for m in ("base", "lora_r8", "full_ft"):
        src = os.path.join(DEMO, m)
        for q in ("F16", "Q8_0"):
            p = str(out / f"{m}-{q}.gguf")
            qd.write_gguf(src, p, q)
            paths[m, q] = p
        p = str(out / f"{m}-fp8")
        qd.write_fp8(src, p, "per-channel")
        paths[m, "fp8"] = p
    return paths


_SCANS: dict = {}


def _scan(base, tuned):
    """run_scan, each pair once per module (scans are deterministic; reports are frozen)."""
    if (base, tuned) not in _SCANS:
        _SCANS[base, tuned] = run_scan(base, tuned, CFG)
    return _SCANS[base, tuned]


def _same_decisions(a, b, tol):
    """Same intruder decision for every vector whose max|cos| is farther than tol from epsilon;
    returns the largest |max_cos| difference seen."""
    assert [l.name for l in a.layers] == [l.name for l in b.layers]
    worst = 0.0
    for la, lb in zip(a.layers, b.layers):
        assert la.status == lb.status == "scanned", la.name
        for x, y in zip(la.max_cos, lb.max_cos):
            worst = max(worst, abs(x - y))
            if abs(x - EPS) > tol:
                assert (x < EPS) == (y < EPS), (la.name, x, y)
    return worst


# ------------------------------------------------------------------ safetensors dtypes

def _raw_st(path, tensors, metadata=None):
    """Write a safetensors file by hand: {name: (dtype, shape, bytes)}."""
    header, blob = {}, b""
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + blob)


def test_every_dtype_of_the_safetensors_library_is_known(tmp_path):
    """Our table holds exactly the dtypes the installed safetensors library accepts."""
    from safetensors import deserialize

    h = json.dumps({"t": {"dtype": "NOPE", "shape": [0], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(Exception) as exc:
        deserialize(struct.pack("<Q", len(h)) + h)
    lib = set(re.findall(r"`(\w+)`", str(exc.value).split("expected one of", 1)[1]))
    assert lib == set(DTYPES) | set(PACKED_BITS)


def test_every_dtype_parses_and_unusable_ones_are_skipped_with_a_note(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for dt, (size, _) in DTYPES.items():
        tensors[f"model.layers.0.{dt.lower()}.weight"] = (dt, (4, 8), rng.bytes(32 * size))
    for dt, bits in PACKED_BITS.items():
        tensors[f"model.layers.0.{dt.lower()}.weight"] = (dt, (4, 8), rng.bytes(32 * bits // 8))
    # float weights so that the FP8 ones decode to finite values
    for dt in ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"):
        tensors[f"model.layers.0.{dt.lower()}.weight"] = (dt, (4, 8), bytes([0x30 + i % 7 for i in range(32)]))
    p = str(tmp_path / "all.safetensors")
    _raw_st(p, tensors)
    sf = SafetensorsFile(p)
    assert {e.dtype for e in sf.entries.values()} == set(DTYPES) | set(PACKED_BITS)
    ck = open_checkpoint(p)
    for name, ref in ck.refs.items():
        why = dequant.unusable(ref)
        usable = ref.dtype in ("F64", "F32", "F16", "BF16") or ref.dtype.startswith("F8_")
        assert (why is None) == usable, (name, why)
        if usable:
            t = read_ref(ref)
            assert t.is_floating_point() and tuple(t.shape) == (4, 8)
            if ref.dtype.startswith("F8_"):
                assert bool(torch.isfinite(t).all()) and ref.storage.kind.endswith("(no scale)")
    res = CliRunner().invoke(cli, ["layers", p, "--all"])
    assert res.exit_code == 0, res.output
    for dt in list(DTYPES) + list(PACKED_BITS):
        assert dt in res.output


@pytest.mark.parametrize("dt", dequant.FP8_DTYPES)
def test_float8_tables_equal_torch(dt):
    from intruder.io.safetensors_file import torch_dtype

    native = torch_dtype(dt)
    if native is None:
        pytest.skip(f"this torch has no type for {dt}")
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(native).to(torch.float32).numpy()
    got = dequant.minifloat_table(dt)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])


def _demo_tensors(model="base"):
    return qd.load_model(os.path.join(DEMO, model))


def test_fp8_layouts_decode_exactly(tmp_path):
    from safetensors.torch import save_file

    rng = torch.Generator().manual_seed(0)
    w = torch.randn(200, 130, generator=rng)
    out, want = {}, {}
    for layout in ("per-tensor", "per-channel", "block"):
        codes, scale = qd.fp8_quantize(w, layout)
        name = f"model.layers.0.{layout.replace('-', '_')}.weight"
        out[name] = codes
        out[name[: -len("weight")] + ("weight_scale_inv" if layout == "block" else "weight_scale")] = scale
        full = scale if layout != "block" else scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
        want[name] = codes.to(torch.float32) * full
    q8 = torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=rng)
    scb = torch.rand(64, generator=rng) + 0.5
    out["model.layers.0.bnb.weight"] = q8
    out["model.layers.0.bnb.SCB"] = scb
    want["model.layers.0.bnb.weight"] = q8.to(torch.float32) * scb[:, None] / 127
    d = tmp_path / "m"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [128, 128]}}))
    ck = open_checkpoint(str(d))
    kinds = {n: ck.refs[n].storage.kind for n in want}
    assert kinds == {"model.layers.0.per_tensor.weight": "fp8_e4m3 per-tensor scale",
                     "model.layers.0.per_channel.weight": "fp8_e4m3 per-channel scale",
                     "model.layers.0.block.weight": "fp8_e4m3 128x128 block scale (weight_scale_inv)",
                     "model.layers.0.bnb.weight": "int8 row-wise absmax (bitsandbytes SCB)"}
    for n, t in want.items():
        got = read_ref(ck.refs[n])
        assert got.dtype == torch.float32 and torch.equal(got, t), n
    # the scan pipeline's own reader decodes the same way
    from intruder.run.stream import Reader

    r = Reader(False, read_ref)
    for n, t in want.items():
        assert torch.equal(r.read(ck.refs[n]), t), n


def test_fp8_per_channel_demo_scans_like_the_original(conv):
    base = os.path.join(DEMO, "base")
    for m in ("lora_r8", "full_ft"):
        orig = _scan(base, os.path.join(DEMO, m))
        fp8 = _scan(base, conv[m, "fp8"])
        worst = _same_decisions(orig, fp8, TOL_FP8)
        assert worst < TOL_FP8
        for l in fp8.layers:
            assert l.storage_tuned == "fp8_e4m3 per-channel scale"
            assert l.storage_base == "f16"
        # top singular values within FP8's relative rounding (3 mantissa bits: <= 2^-4 per entry)
        for la, lb in zip(orig.layers, fp8.layers):
            np.testing.assert_allclose(lb.sigma_tuned, la.sigma_tuned, rtol=0.02)
    # FP8 of the base itself: rounding, not a fine-tune
    rep = _scan(base, conv["base", "fp8"])
    assert sum(len(l.intruders) for l in rep.layers) == 0
    assert max(l.margin.novel_strength for l in rep.layers if l.margin) < 0.1


def test_checkpoint_with_unsupported_tensors_still_scans(tmp_path):
    """One BOOL, one int32, one packed F4 and one int8-without-scale matrix: each skipped with
    its reason, everything else scanned; `intruder layers` lists them."""
    from safetensors.torch import save_file

    t0, t1 = _demo_tensors("base"), _demo_tensors("lora_r8")
    victim = "model.layers.1.self_attn.v_proj.weight"
    extra = {"model.layers.0.mask.weight": torch.ones(8, 8, dtype=torch.bool),
             "model.layers.0.codes.weight": torch.arange(64, dtype=torch.int32).reshape(8, 8)}
    for d, t in (("b", t0), ("t", t1)):
        os.makedirs(tmp_path / d)
        tt = dict(t, **extra)
        if d == "t":
            tt[victim] = t1[victim].to(torch.float32).round().to(torch.int8)
        save_file(tt, str(tmp_path / d / "model.safetensors"))
    # and an F4 tensor, written by hand (torch has no unpacked F4)
    p = str(tmp_path / "t" / "model.safetensors")
    sf = SafetensorsFile(p)
    tensors = {n: (e.dtype, e.shape, sf.raw_bytes(n)) for n, e in sf.entries.items()}
    tensors["model.layers.0.packed.weight"] = ("F4", (8, 8), bytes(32))
    _raw_st(p, tensors)
    p0 = str(tmp_path / "b" / "model.safetensors")
    sf0 = SafetensorsFile(p0)
    t0b = {n: (e.dtype, e.shape, sf0.raw_bytes(n)) for n, e in sf0.entries.items()}
    t0b["model.layers.0.packed.weight"] = ("F4", (8, 8), bytes(32))
    _raw_st(p0, t0b)
    rep = _scan(str(tmp_path / "b"), str(tmp_path / "t"))
    skipped = dict(rep.skipped)
    assert "BOOL" in skipped["model.layers.0.mask.weight"]
    assert "I32 integer codes" in skipped["model.layers.0.codes.weight"]
    assert "packed F4" in skipped["model.layers.0.packed.weight"]
    assert skipped[victim].startswith("tuned: I8 integer codes")
    assert len([l for l in rep.layers if l.status == "scanned"]) == 27
    res = CliRunner().invoke(cli, ["scan", str(tmp_path / "b"), str(tmp_path / "t"), "--no-cache",
                                   "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {s["name"] for s in doc["skipped"]} >= set(extra) | {victim}
    res = CliRunner().invoke(cli, ["layers", str(tmp_path / "t"), "--all"])
    assert res.exit_code == 0 and "F4" in res.output and "BOOL" in res.output
    assert "no (skipped: its dtype holds codes, not weights)" in res.output
    res = CliRunner().invoke(cli, ["scan", str(tmp_path / "b"), str(tmp_path / "t"), "--no-cache",
                                   "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "note: 4 matrices skipped for their stored dtype" in res.output


# ------------------------------------------------------------------------------- GGUF

def test_gguf_f16_scans_exactly_like_safetensors(conv):
    base = os.path.join(DEMO, "base")
    for m in ("lora_r8", "full_ft"):
        orig = _scan(base, os.path.join(DEMO, m))
        both = _scan(conv["base", "F16"], conv[m, "F16"])
        mixed = _scan(base, conv[m, "F16"])
        for rep in (both, mixed):
            assert _same_decisions(orig, rep, 0.0) <= 1e-12  # same tensors, same code path
            assert [[i.index for i in l.intruders] for l in rep.layers] == \
                   [[i.index for i in l.intruders] for l in orig.layers]
        assert {l.storage_tuned for l in both.layers} == {"gguf F16"}
        assert {l.storage_base for l in both.layers} == {"gguf F16"}
    # the tensors themselves, q/k rows back in Hugging Face order: bit-identical
    ck, st = open_checkpoint(conv["lora_r8", "F16"]), open_checkpoint(os.path.join(DEMO, "lora_r8"))
    for name in st.refs:
        assert torch.equal(ck.read(name), st.read(name)), name


def test_quantized_storage_is_named_in_the_terminal_and_layers(conv, tmp_path):
    res = CliRunner().invoke(cli, ["scan", os.path.join(DEMO, "base"), conv["lora_r8", "Q8_0"],
                                   "--no-cache", "-o", str(tmp_path / "r.json"),
                                   "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "decoded to float before the scan: tuned gguf Q8_0 (28 matrices)" in res.output
    assert (tmp_path / "r.html").read_text().count("F16 (tuned: gguf Q8_0)") == 28
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {(l["storage_base"], l["storage_tuned"]) for l in doc["layers"]} == {("f16", "gguf Q8_0")}
    res = CliRunner().invoke(cli, ["layers", conv["lora_r8", "fp8"], "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)["tensors"]}
    assert rows["model.layers.0.self_attn.q_proj.weight"]["storage"] == "fp8_e4m3 per-channel scale"


def test_float8_decodes_without_a_torch_float8_type(monkeypatch, tmp_path):
    """torch < 2.1 (no float8) / < 2.7 (no float8_e8m0fnu): the 256-entry tables decode."""
    from safetensors.torch import save_file

    from intruder.io import dequant, safetensors_file

    codes, scale = qd.fp8_quantize(torch.randn(64, 32, generator=torch.Generator().manual_seed(3)),
                                   "per-channel")
    save_file({"m.weight": codes, "m.weight_scale": scale}, str(tmp_path / "f.safetensors"))
    ref = open_checkpoint(str(tmp_path / "f.safetensors")).refs["m.weight"]
    want = read_ref(ref)
    def no_float8(dt):
        return None if dt.startswith("F8") else getattr(torch, DTYPES[dt][1])

    for module in (safetensors_file, dequant):  # the reader and the decoder each hold the name
        monkeypatch.setattr(module, "torch_dtype", no_float8)
    assert torch.equal(read_ref(ref), want)
    assert torch.equal(want, codes.to(torch.float32) * scale)


def test_gguf_q8_0_scans_like_safetensors_within_tolerance(conv):
    base = os.path.join(DEMO, "base")
    for m in ("lora_r8", "full_ft"):
        orig = _scan(base, os.path.join(DEMO, m))
        q8 = _scan(conv["base", "Q8_0"], conv[m, "Q8_0"])
        assert _same_decisions(orig, q8, TOL_Q8) < TOL_Q8
        assert {l.storage_tuned for l in q8.layers} == {"gguf Q8_0"}
    # a Q8_0 GGUF of the base against the base: dense rounding noise, no intruders
    rep = _scan(base, conv["base", "Q8_0"])
    assert sum(len(l.intruders) for l in rep.layers) == 0
    assert max(l.margin.novel_strength for l in rep.layers if l.margin) < 0.02
    assert min(min(l.max_cos) for l in rep.layers) > 0.99


def test_qk_row_permutation_is_undone(conv, monkeypatch):
    w = torch.randn(96, 40, dtype=torch.float64)
    for heads in (1, 2, 3, 6):
        p = ggufio.permute_rows(w, heads)
        assert not torch.equal(p, w)
        assert torch.equal(ggufio.unpermute_rows(p, heads), w)
    # a row-permuted matrix has permuted left singular vectors: it matches its original badly
    u = torch.linalg.svd(w, full_matrices=False)[0]
    up = torch.linalg.svd(ggufio.permute_rows(w, 4), full_matrices=False)[0]
    assert float((up[:, :10].mT @ u).abs().max(dim=1).values.min()) < 0.6
    # the demo base as GGUF: undone, it equals the base (no change); not undone, q/k look rotated
    base = os.path.join(DEMO, "base")
    pairing = pair_checkpoints(open_checkpoint(base, allow_adapter=False), open_checkpoint(conv["base", "F16"]))
    assert all(torch.equal(read_ref(p.base), read_ref(p.tuned)) for p in pairing.pairs)
    monkeypatch.setattr(ggufio, "PERMUTED_ARCHS", ())
    rep = run_scan(base, conv["base", "F16"], CFG)  # not cached: the permutation is left in place
    changed = {l.name for l in rep.layers if l.status == "scanned"}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(4) for p in "qk"}
    assert all(min(l.max_cos) < 0.9 for l in rep.layers if l.status == "scanned")


def test_gguf_k_quants_and_other_types_decode_through_gguf(tmp_path):
    """Q4_K, Q6_K, Q4_0, Q5_1, BF16 tensors: read equals gguf.quants.dequantize, PyTorch shape."""
    rng = np.random.default_rng(1)
    p = str(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(1)
    w.add_head_count(2)
    want = {}
    for i, name in enumerate(("Q4_K", "Q6_K", "Q2_K", "Q5_K")):
        qt = gguf.GGMLQuantizationType[name]
        size = gguf.GGML_QUANT_SIZES[qt][1]
        raw = rng.integers(0, 256, size=(8, 2 * size), dtype=np.uint8)
        # f16 super-block scales: small finite values (random bytes could be inf / nan)
        d_off = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q2_K": [size - 4, size - 2], "Q6_K": [size - 2]}[name]
        for blk in range(2):
            for o in d_off:
                raw[:, blk * size + o: blk * size + o + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        gname = f"blk.0.ffn_{['up', 'gate', 'down', 'attn_v'][i]}.weight" if i < 3 else "blk.0.attn_v.weight"
        w.add_tensor(gname, raw, raw_dtype=qt)
        want[gname] = gguf.quants.dequantize(raw, qt)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    for name in ("Q4_0", "Q5_1", "BF16"):
        qt = gguf.GGMLQuantizationType[name]
        gname = {"Q4_0": "blk.0.attn_output.weight", "Q5_1": "blk.0.attn_q.weight",
                 "BF16": "blk.0.attn_k.weight"}[name]
        w.add_tensor(gname, gguf.quants.quantize(x, qt), raw_dtype=qt)
        want[gname] = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = open_checkpoint(p)
    by_file = {ref.name: (n, ref) for n, ref in ck.refs.items()}
    assert by_file["blk.0.ffn_up.weight"][0] == "model.layers.0.mlp.up_proj.weight"
    assert by_file["blk.0.attn_q.weight"][1].storage.heads == 2
    for gname, arr in want.items():
        name, ref = by_file[gname]
        t = read_ref(ref)
        assert tuple(t.shape) == tuple(arr.shape) == ref.shape
        if ref.storage.heads:  # q/k: stored permuted, read back in Hugging Face order
            arr = ggufio.unpermute_rows(torch.from_numpy(arr), ref.storage.heads).numpy()
        assert np.array_equal(t.to(torch.float32).numpy(), arr), gname
        assert ref.storage.kind == f"gguf {ref.dtype}"


def test_gguf_names_follow_the_other_checkpoint(conv, tmp_path):
    """A base whose names drop the `model.` prefix still pairs with a GGUF (gguf's tables know
    that spelling)."""
    from safetensors.torch import save_file

    t = {k.removeprefix("model."): v for k, v in _demo_tensors("base").items()}
    save_file(t, str(tmp_path / "b.safetensors"))
    rep = _scan(str(tmp_path / "b.safetensors"), conv["lora_r8", "F16"])
    assert len(rep.layers) == 28 and not rep.unpaired_tuned
    assert rep.layers[0].name.startswith("layers.")


def test_gguf_garbage_and_missing_split_are_one_line_errors(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(40))
    res = CliRunner().invoke(cli, ["layers", str(p)])
    assert res.exit_code == 1 and "bad.gguf" in res.output and "Traceback" not in res.output
    with pytest.raises(CheckpointError, match="GGUF"):
        open_checkpoint(str(p))
    p.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        open_checkpoint(str(p))


# ------------------------------------------------------------ quantization noise and provenance

@pytest.mark.parametrize("layout", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "fp8 per-tensor",
                                    "fp8 per-channel", "fp8 block", "int8 SCB"])
def test_noise_estimate_matches_the_measured_rounding_error(layout):
    """noise_rms, read from the stored values alone, against ||decoded - original||_rms."""
    from intruder.types import Storage, TensorRef

    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.02
    if layout.startswith("Q"):
        qt = gguf.GGMLQuantizationType[layout]
        d = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.float().numpy(), qt), qt))
        ref, scale = TensorRef("x.gguf", "x", (256, 512), layout, Storage(f"gguf {layout}")), None
    elif layout.startswith("fp8"):
        kind = layout.split()[1]
        codes, scale = qd.fp8_quantize(w, kind)
        full = scale if kind != "block" else \
            scale.repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)[:, :512]
        d = (codes.to(torch.float32) * full).to(torch.float32)
        block = (128, 128) if kind == "block" else (1, 1)
        sref = TensorRef("x.safetensors", "s", tuple(scale.shape), "F32")
        ref = TensorRef("x.safetensors", "x", (256, 512), "F8_E4M3", Storage(kind, sref, block))
    else:
        scale = w.abs().amax(1).to(torch.float32)  # (m,) bitsandbytes SCB
        d = ((w / (scale[:, None].double() / 127)).round() * scale[:, None] / 127).to(torch.float32)
        sref = TensorRef("x.safetensors", "s", (256,), "F32")
        ref = TensorRef("x.safetensors", "x", (256, 512), "I8", Storage("scb", sref, (1, 512), 127.0))
    est = dequant.noise_rms(ref, d, lambda r: scale)
    true = float((d.double() - w).square().mean().sqrt())
    assert est == pytest.approx(true, rel=0.1)
    # float grids add nothing beyond what the margin already measures
    assert dequant.noise_rms(TensorRef("x.gguf", "x", (256, 512), "F16", Storage("gguf F16")),
                             d, None) is None


def test_provenance_sees_quantization_as_rounding_not_fine_tuning(conv):
    """Without the quantization noise floor every quantized matrix looked like a dense (full)
    fine-tune: a Q8_0 base read as full-ft-like at confidence 0.97."""
    base = os.path.join(DEMO, "base")
    for q in ("Q8_0", "fp8"):
        rep = _scan(base, conv["base", q])
        assert summary(rep)["provenance"]["verdict"] == "precision-only", q
        assert {l.update_shape.grid for l in rep.layers if l.update_shape} == {"quantized"}
        lora = summary(_scan(base, conv["lora_r8", q]))["provenance"]
        assert lora["verdict"] == "lora-like" and lora["estimated_rank"] == 8, q
    both = summary(_scan(conv["base", "Q8_0"], conv["lora_r8", "Q8_0"]))["provenance"]
    assert both["verdict"] == "lora-like" and both["estimated_rank"] == 8


def test_track_counts_quantization_rounding_step_to_step(conv, tmp_path):
    res = CliRunner().invoke(cli, ["track", os.path.join(DEMO, "base"), conv["base", "Q8_0"],
                                   conv["lora_r8", "Q8_0"], "--no-cache", "-o",
                                   str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    rows = [l for l in res.output.splitlines() if l.strip().startswith(("1 ", "2 "))]
    assert "precision-only" in rows[0]
    assert rows[1].count("lora-like r~8") == 2  # against the base and against the Q8_0 base


def test_scale_refuses_quantized_tuned_weights(conv, tmp_path):
    """Rescaled weights would have to be re-quantized: refused in one line, nothing written."""
    base = os.path.join(DEMO, "base")
    for q in ("Q8_0", "fp8"):
        out = tmp_path / f"out-{q}"
        res = CliRunner().invoke(cli, ["scale", base, conv["lora_r8", q], "--alpha", "0.5",
                                       "-o", str(out)],
                                 env={"INTRUDER_CACHE_DIR": str(tmp_path / "cache")})
        assert res.exit_code == 1, res.output
        err = [l for l in res.output.splitlines() if l.startswith("Error:")]
        assert len(err) == 1 and ("cannot write GGUF" in err[0] or "does not re-quantize" in err[0])
        assert not os.path.exists(out / "alpha-0.5")


# ------------------------------------------------------------------ bitsandbytes 4-bit

BNB = os.path.join(os.path.dirname(qd.HERE), "fixtures", "formats")


def test_bitsandbytes_4bit_decodes_like_bitsandbytes():
    """fixtures/formats/bnb4.safetensors: NF4 (compressed statistics, 2 nested groups) and FP4,
    as bitsandbytes 0.50.2 saved them; the decoded weights, cast to bfloat16, hash to what its
    own dequantize_4bit gave (fixtures/bnb4_golden.py)."""
    import hashlib

    with open(os.path.join(BNB, "bnb4.json")) as fh:
        golden = json.load(fh)
    ck = open_checkpoint(os.path.join(BNB, "bnb4.safetensors"))
    from intruder.run.stream import Reader

    for name, g in golden.items():
        ref = ck.refs[name]
        assert ref.shape == tuple(g["shape"]) and dequant.unusable(ref) is None
        assert ref.storage.kind == f"bitsandbytes {g['quant_type']} (blocks of 64)"
        t = read_ref(ref)
        assert t.dtype == torch.float32 and tuple(t.shape) == ref.shape
        bf = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()
        assert hashlib.sha256(bf).hexdigest() == g["sha256_bf16"], name
        assert torch.equal(Reader(False, read_ref).read(ref), t)


def test_bitsandbytes_4bit_tuned_scans_against_a_bf16_base(tmp_path):
    """The stored codes are (m*n/2, 1) uint8; pairing uses the logical (m, n) shape."""
    from safetensors.torch import save_file

    with open(os.path.join(BNB, "bnb4.json")) as fh:
        golden = json.load(fh)
    g = torch.Generator().manual_seed(5)
    save_file({n: (torch.randn(*v["shape"], generator=g) * 0.02).to(torch.bfloat16)
               for n, v in golden.items()}, str(tmp_path / "base.safetensors"))
    rep = _scan(str(tmp_path / "base.safetensors"), os.path.join(BNB, "bnb4.safetensors"))
    assert [l.status for l in rep.layers] == ["scanned", "scanned"]
    assert {l.storage_tuned for l in rep.layers} == {
        "bitsandbytes nf4 (blocks of 64)", "bitsandbytes fp4 (blocks of 64)"}


def test_bitsandbytes_4bit_noise_estimate(tmp_path):
    """NF4 rounding of a Gaussian matrix (nearest level x block absmax, quantized here with the
    fixture's own quant_map): noise_rms within 10% of the measured error."""
    from intruder.types import Storage, TensorRef

    ck = open_checkpoint(os.path.join(BNB, "bnb4.safetensors"))
    ref = ck.refs["model.layers.0.mlp.up_proj.weight"]
    qmap = read_ref(dict(ref.storage.parts)["quant_map"]).double()  # (16,)
    w = torch.randn(64, 320, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    blocks = w.reshape(-1, 64)  # (320, 64)
    absmax = blocks.abs().amax(dim=1)  # (320,)
    v = blocks / absmax[:, None]
    d = (qmap[(v[..., None] - qmap).abs().argmin(-1)] * absmax[:, None]).reshape(64, 320)
    aref = TensorRef("x", "absmax", (320,), "F32")
    st = Storage("bitsandbytes nf4 (blocks of 64)", aref, (64, 0),
                 parts=(("quant_map", dict(ref.storage.parts)["quant_map"]),))
    est = dequant.noise_rms(TensorRef("x", "w", (64, 320), "U8", st), d,
                            lambda r: absmax.float() if r is aref else read_ref(r))
    true = float((d - w).square().mean().sqrt())
    assert est == pytest.approx(true, rel=0.1)


def test_a_scale_that_fits_no_layout_is_skipped_not_ignored(tmp_path):
    """Decoding FP8 codes without their scale would give other weights: skipped with a note."""
    from safetensors.torch import save_file

    codes, _ = qd.fp8_quantize(torch.randn(64, 48), "per-channel")
    save_file({"m.weight": codes, "m.weight_scale": torch.ones(5, 7)},
              str(tmp_path / "f.safetensors"))
    ref = open_checkpoint(str(tmp_path / "f.safetensors")).refs["m.weight"]
    assert "weight_scale F32 [5, 7] that fits no scale layout of a 64x48 weight" in dequant.unusable(ref)
