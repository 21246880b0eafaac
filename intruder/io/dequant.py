"""Quantized and scaled safetensors weights: recognise the layouts people publish, decode them to
float before any analysis, and say which tensors cannot be used (and why).

Layouts decoded (w: the float weight, m x n; q: the stored codes, m x n):

- 8-bit floats (F8_E4M3, F8_E5M2, the FNUZ variants, F8_E8M0), with no scale: w = float(q);
- with a `<module>.weight_scale` tensor beside the weight (compressed-tensors, FBGEMM, ModelOpt):
  shape [] or [1] (per-tensor), [m] or [m, 1] (per-channel), [m, n/g] (per-group of g columns),
  or [ceil(m/bm), ceil(n/bn)] blocks (bm x bn from weight_block_size, else 128 x 128):
  w = q * scale of the element's block; a scale of any other shape makes the weight unusable
  (decoding the codes without it would give other weights);
- with `<module>.weight_scale_inv` (DeepSeek-V3 / Qwen3 FP8): the same, in blocks of
  `quantization_config.weight_block_size` of config.json (128 x 128 when absent) -- despite its
  name the stored value multiplies the codes;
- int8 codes with a float `weight_scale` (compressed-tensors W8A8): as above;
- int8 codes with bitsandbytes' `<module>.SCB` (row-wise absmax): w = q * SCB[row] / 127;
- bitsandbytes 4-bit (NF4 / FP4, `weight.quant_state.bitsandbytes__nf4` beside uint8 codes, two
  per byte, high nibble first): w = quant_map[code] * absmax[block], the absmax itself stored
  8-bit (nested_quant_map[a] * nested_absmax[a's block of 256] + nested_offset) when
  compress_statistics was on; matched to bitsandbytes' own dequantize_4bit in the tests.

Integer, boolean, complex and packed sub-byte tensors with no known layout are codes, not weights:
`unusable()` gives the one-line reason the scan reports for skipping them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, cast

import numpy as np

from ..errors import CheckpointError
from ..types import Storage, TensorRef
from .safetensors_file import FLOAT_DTYPES, PACKED_BITS, torch_dtype

if TYPE_CHECKING:
    import torch

FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0")
INT_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
SCALE_DTYPES = FLOAT_DTYPES + ("F8_E8M0",)
DEFAULT_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size
_NAMES = {"F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2", "F8_E4M3FNUZ": "fp8_e4m3fnuz",
          "F8_E5M2FNUZ": "fp8_e5m2fnuz", "F8_E8M0": "fp8_e8m0", "I8": "int8"}
# (exponent bits, mantissa bits, bias, variant) of the 8-bit float formats
_MINIFLOATS = {"F8_E4M3": (4, 3, 7, "fn"), "F8_E5M2": (5, 2, 15, "ieee"),
               "F8_E4M3FNUZ": (4, 3, 8, "fnuz"), "F8_E5M2FNUZ": (5, 2, 16, "fnuz"),
               "F8_E8M0": (8, 0, 127, "e8m0")}


def storage_name(dtype: str) -> str:
    return _NAMES.get(dtype, dtype.lower())


def minifloat_table(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of an 8-bit float format (NaN where it has none)."""
    ebits, mbits, bias, variant = _MINIFLOATS[dtype]
    out = np.empty(256, dtype=np.float64)
    for code in range(256):
        if variant == "e8m0":  # unsigned exponent only: 2^(e - 127), 0xFF is NaN
            out[code] = math.nan if code == 0xFF else math.ldexp(1.0, code - bias)
            continue
        sign = -1.0 if code >> 7 else 1.0
        e = (code >> mbits) & ((1 << ebits) - 1)
        m = code & ((1 << mbits) - 1)
        top = (1 << ebits) - 1
        if variant == "fnuz" and code == 0x80:  # the only NaN; no negative zero, no infinity
            out[code] = math.nan
            continue
        if variant == "ieee" and e == top:
            out[code] = sign * math.inf if m == 0 else math.nan
            continue
        if variant == "fn" and e == top and m == (1 << mbits) - 1:  # S.1111.111 is NaN
            out[code] = math.nan
            continue
        if e == 0:
            out[code] = sign * math.ldexp(m, 1 - bias - mbits)
        else:
            out[code] = sign * math.ldexp((1 << mbits) + m, e - bias - mbits)
    return out.astype(np.float32)


_TABLES: dict[str, torch.Tensor] = {}


def decode_float8(codes, dtype: str):
    """The float32 values of 8-bit float codes (a uint8 torch tensor of any shape): torch's own
    conversion where this torch has the type, else the exact 256-entry table."""
    import torch

    native = torch_dtype(dtype)
    if native is not None:
        return codes.view(native).to(torch.float32)
    table = _TABLES.get(dtype)
    if table is None:
        table = _TABLES[dtype] = torch.from_numpy(minifloat_table(dtype))
    return table[codes.to(torch.int64)]


def unusable(ref: TensorRef) -> str | None:
    """Why the scan cannot use this tensor as float weights, or None when it can."""
    if ref.storage is not None:
        return ref.storage.problem or None
    if ref.dtype in FLOAT_DTYPES or ref.dtype in FP8_DTYPES:
        return None
    if ref.dtype == "BOOL":
        return "BOOL tensor (a mask, not weights); not scanned"
    if ref.dtype in INT_DTYPES:
        return (f"{ref.dtype} integer codes with no known scale layout (not weights; "
                f"int8 + .SCB or + weight_scale are decoded); not scanned")
    if ref.dtype == "C64":
        return "complex64 tensor; not scanned"
    if ref.dtype in PACKED_BITS:
        return (f"packed {ref.dtype} (sub-byte floats without a defined packing order or block "
                f"scales); not scanned")
    return f"stored as {ref.dtype}, which this tool cannot decode; not scanned"


def _scale_grid(shape: tuple[int, ...], m: int, n: int) -> tuple[int, int] | None:
    """The scale tensor's shape as a 2-D grid (s0, s1) over an m x n weight, or None."""
    if len(shape) == 0 or tuple(shape) == (1,):
        return 1, 1
    if len(shape) == 1:
        return (shape[0], 1) if shape[0] == m else None
    if len(shape) == 2:
        return shape[0], shape[1]
    return None


def _layout_kind(dtype: str, grid: tuple[int, int], block: tuple[int, int], m: int, n: int,
                 inverse: bool) -> str:
    what = storage_name(dtype)
    s0, s1 = grid
    if s0 == 1 and s1 == 1:
        how = "per-tensor scale"
    elif s0 == m and s1 == 1:
        how = "per-channel scale"
    elif s0 == m:
        how = f"per-group scale (groups of {block[1]} columns)"
    else:
        how = f"{block[0]}x{block[1]} block scale"
    return f"{what} {how}" + (" (weight_scale_inv)" if inverse else "")


def _block_for(grid: tuple[int, int], m: int, n: int,
               declared: tuple[int, int] | None) -> tuple[int, int] | None:
    """Rows x columns sharing one scale, for the layouts published: per tensor (1, 1), per
    channel (m, 1), per group of g columns (m, n / g), or blocks of the declared size (else
    128 x 128) with partial blocks at the edges. None for any other grid."""
    s0, s1 = grid
    if s0 < 1 or s1 < 1:
        return None
    if s0 == 1 and s1 == 1:
        return m, n
    if s0 == m and n % s1 == 0:
        return 1, n // s1
    for bm, bn in ([declared] if declared else []) + [DEFAULT_BLOCK]:
        if -(-m // bm) == s0 and -(-n // bn) == s1:
            return bm, bn
    return None


def _bnb4(name: str, ref: TensorRef, refs: Mapping[str, TensorRef],
          read_bytes: Callable | None) -> TensorRef | None:
    """The logical (m, n) ref of a bitsandbytes 4-bit weight, or None (not that layout, or an
    inconsistent one: then the scan skips it as uint8 codes)."""
    import json

    if read_bytes is None or ref.dtype != "U8":
        return None
    for qt in ("nf4", "fp4"):
        qs = refs.get(f"{name}.quant_state.bitsandbytes__{qt}")
        if qs is not None:
            break
    else:
        return None
    absmax, qmap = refs.get(name + ".absmax"), refs.get(name + ".quant_map")
    if (qs.dtype != "U8" or len(qs.shape) != 1 or not 0 < qs.shape[0] <= 4096 or absmax is None
            or qmap is None or qmap.dtype not in FLOAT_DTYPES or tuple(qmap.shape) != (16,)):
        return None
    try:
        doc = json.loads(bytes(read_bytes(qs).numpy()).decode("utf-8"))
        bs, shape = int(doc["blocksize"]), [int(x) for x in doc["shape"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return None
    numel = 1
    for d in ref.shape:
        numel *= d
    if (doc.get("quant_type") != qt or bs < 1 or len(shape) != 2 or min(shape) < 1
            or shape[0] * shape[1] != 2 * numel or len(absmax.shape) != 1
            or absmax.shape[0] != -(-shape[0] * shape[1] // bs)):
        return None
    parts: list[tuple[str, object]] = [("quant_map", qmap)]
    if absmax.dtype == "U8":  # compress_statistics: the absmax values are 8-bit codes themselves
        nab, nqm = refs.get(name + ".nested_absmax"), refs.get(name + ".nested_quant_map")
        try:
            nbs, off = int(doc["nested_blocksize"]), float(doc["nested_offset"])
        except (KeyError, TypeError, ValueError):
            return None
        if (nab is None or nqm is None or nbs < 1 or tuple(nqm.shape) != (256,)
                or len(nab.shape) != 1 or nab.shape[0] != -(-absmax.shape[0] // nbs)
                or nab.dtype not in FLOAT_DTYPES or nqm.dtype not in FLOAT_DTYPES or off != off):
            return None
        parts += [("nested_absmax", nab), ("nested_quant_map", nqm), ("nested_offset", off),
                  ("nested_blocksize", nbs)]
    elif absmax.dtype not in FLOAT_DTYPES:
        return None
    st = Storage(f"bitsandbytes {qt} (blocks of {bs})", absmax, (bs, 0), parts=tuple(parts))
    return TensorRef(ref.path, ref.name, (shape[0], shape[1]), ref.dtype, st)


def attach_storage(refs: Mapping[str, TensorRef], config: dict | None = None,
                   read_bytes: Callable | None = None) -> dict[str, TensorRef]:
    """Refs with `storage` set on every quantized weight whose layout is known.

    `config`: the model's config.json (for quantization_config.weight_block_size);
    read_bytes(ref): a small tensor's bytes (bitsandbytes 4-bit's quant_state JSON)."""
    declared = None
    qc = (config or {}).get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict):
        wbs = qc.get("weight_block_size")
        if (isinstance(wbs, list) and len(wbs) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in wbs)):
            declared = (wbs[0], wbs[1])
    out = dict(refs)
    for name, ref in refs.items():
        four = _bnb4(name, ref, refs, read_bytes) if name.endswith(".weight") else None
        if four is not None:
            out[name] = four
            continue
        if ref.storage is not None or len(ref.shape) != 2:
            continue
        if ref.dtype not in FP8_DTYPES and ref.dtype not in INT_DTYPES:
            continue
        m, n = ref.shape
        stem = name[: -len("weight")] if name.endswith("weight") else name + "."
        storage = misfit = None
        for suffix, inverse in (("weight_scale", False), ("weight_scale_inv", True)):
            sref = refs.get(stem + suffix)
            if sref is None:
                continue
            grid = _scale_grid(sref.shape, m, n) if sref.dtype in SCALE_DTYPES else None
            block = _block_for(grid, m, n, declared) if grid else None
            if block is None or grid is None:  # a scale that fits no layout: decoding without it would be wrong
                misfit = (f"{storage_name(ref.dtype)} with {suffix} {sref.dtype} "
                          f"{list(sref.shape)} that fits no scale layout of a {m}x{n} weight; "
                          f"not scanned")
                continue
            if ref.dtype != "I8" and ref.dtype not in FP8_DTYPES:
                continue
            storage = Storage(_layout_kind(ref.dtype, grid, block, m, n, inverse), sref, block)
            break
        scb = refs.get(stem + "SCB")
        if storage is None and ref.dtype == "I8" and scb is not None and \
                scb.dtype in FLOAT_DTYPES and tuple(scb.shape) in ((m,), (m, 1)):
            storage = Storage("int8 row-wise absmax (bitsandbytes SCB)", scb, (1, n), 127.0)
        if storage is None and misfit is not None:
            storage = Storage(f"{storage_name(ref.dtype)} (scale not understood)", problem=misfit)
        if storage is None and ref.dtype in FP8_DTYPES:
            storage = Storage(f"{storage_name(ref.dtype)} (no scale)")
        if storage is not None:
            out[name] = TensorRef(ref.path, ref.name, ref.shape, ref.dtype, storage)
    return out


def decode(ref: TensorRef, read_bytes: Callable, read: Callable):
    """The float weights of a quantized ref: float32, shape ref.shape.

    read_bytes(ref) gives a tensor's stored bytes as a flat uint8 torch tensor; read(ref) a float
    tensor (for the scale)."""
    import torch

    st = ref.storage
    plain = TensorRef(ref.path, ref.name, ref.shape, ref.dtype)
    if st is not None and st.kind.startswith("bitsandbytes "):
        return _decode_bnb4(ref, st, read_bytes, read)
    if ref.dtype in FP8_DTYPES:
        w = decode_float8(read_bytes(plain), ref.dtype).reshape(ref.shape)  # (m, n) float32
    elif ref.dtype == "I8":
        w = read_bytes(plain).view(torch.int8).reshape(ref.shape).to(torch.float32)
    else:
        raise CheckpointError(f"{ref.path}: tensor {ref.name!r}: {ref.dtype} cannot be decoded")
    if st is None or st.scale is None:
        return w
    s = read(st.scale)
    if s.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        s = decode_float8(s.contiguous().view(torch.uint8), st.scale.dtype)
    s = s.to(torch.float32)
    m, n = ref.shape
    grid = _scale_grid(tuple(s.shape), m, n)
    if grid is None:
        raise CheckpointError(f"{st.scale.path}: tensor {st.scale.name!r}: scale shape "
                              f"{list(s.shape)} does not fit weight {ref.name!r} {[m, n]}")
    s = s.reshape(grid)  # (s0, s1)
    bm, bn = st.block
    if grid == (m, 1) or grid == (1, 1):
        w.mul_(s)  # broadcast over columns (and rows)
    else:
        full = s.repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]  # (m, n)
        w.mul_(full)
    if st.divisor != 1.0:
        w.div_(st.divisor)
    return w


def _bnb4_absmax(st: Storage, read: Callable):
    """(blocks,) float32 scale of each block of a bitsandbytes 4-bit weight."""
    import torch

    parts = dict(st.parts)
    a = read(st.scale)
    if a.dtype != torch.uint8:
        return a.to(torch.float32).reshape(-1)
    nab = read(parts["nested_absmax"]).to(torch.float32).reshape(-1)  # (ceil(blocks / nbs),)
    nqm = read(parts["nested_quant_map"]).to(torch.float32).reshape(-1)  # (256,)
    group = torch.arange(a.numel()) // cast(int, parts["nested_blocksize"])
    return nqm[a.reshape(-1).to(torch.int64)] * nab[group] + parts["nested_offset"]


def _bnb4_codes(ref: TensorRef, read_bytes: Callable):
    """(m*n,) int64 4-bit codes, two per stored byte, high nibble first."""
    import torch

    packed = read_bytes(TensorRef(ref.path, ref.name, ref.shape, ref.dtype))  # (m*n/2,) uint8
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).to(torch.int64)


def _decode_bnb4(ref: TensorRef, st: Storage, read_bytes: Callable, read: Callable):
    import torch

    m, n = ref.shape
    qmap = read(dict(st.parts)["quant_map"]).to(torch.float32).reshape(-1)  # (16,)
    vals = qmap[_bnb4_codes(ref, read_bytes)]  # (m*n,)
    absmax = _bnb4_absmax(st, read)  # (blocks,)
    bs = st.block[0]
    scale = absmax.repeat_interleave(bs)[: m * n]  # (m*n,)
    return (vals * scale).reshape(m, n)


def _bnb4_noise(st: Storage, w, read: Callable) -> float:
    """NF4 / FP4 levels are not evenly spaced: a value decoded to level i was rounded within half
    the gaps to its neighbours, a step of (q[i+1] - q[i-1]) / 2 (one-sided at the ends) x its
    block's absmax."""
    import torch

    m, n = w.shape
    qmap, _ = read(dict(st.parts)["quant_map"]).to(torch.float64).reshape(-1).sort()  # (16,)
    gaps = torch.empty_like(qmap)  # (16,)
    gaps[1:-1] = (qmap[2:] - qmap[:-2]) / 2
    gaps[0], gaps[-1] = qmap[1] - qmap[0], qmap[-1] - qmap[-2]
    scale = _bnb4_absmax(st, read).to(torch.float64).repeat_interleave(st.block[0])[: m * n]
    v = torch.where(scale != 0, w.reshape(-1) / scale, torch.zeros_like(scale))  # (m*n,) levels
    idx = torch.bucketize(v, (qmap[1:] + qmap[:-1]) / 2)  # nearest level
    step = gaps[idx] * scale.abs()  # (m*n,)
    return float((step.square().mean() / 12.0).sqrt())


def decoded_nbytes(ref: TensorRef) -> int:
    """Host bytes a decoded tensor occupies (float32 for decoded layouts)."""
    n = 4
    for d in ref.shape:
        n *= d
    return n


# GGUF types whose rounding step can be read off the decoded values, per group of `group`
# columns: ("amax", q) step = max|w| / q (symmetric codes, the largest one hit by the block's
# largest value: exact for Q8_0 / Q4_0 / Q5_0), ("range", L) step = (max - min) / L (codes 0..L:
# exact for Q4_1 / Q5_1; for K-quants, whose sub-block scales are themselves rounded, an estimate)
_GGUF_STEPS = {"Q8_0": (32, "amax", 127), "Q4_0": (32, "amax", 8), "Q5_0": (32, "amax", 16),
               "Q4_1": (32, "range", 15), "Q5_1": (32, "range", 31), "Q2_K": (16, "range", 3),
               "Q3_K": (16, "amax", 4), "Q4_K": (32, "range", 15), "Q5_K": (32, "range", 31),
               "Q6_K": (16, "amax", 32)}
_MANTISSA = {"F8_E4M3": (3, 7), "F8_E5M2": (2, 15), "F8_E4M3FNUZ": (3, 8), "F8_E5M2FNUZ": (2, 16)}


def noise_rms(ref: TensorRef, t, read: Callable) -> float | None:
    """Root mean square rounding error the stored format put into the decoded tensor t (m, n),
    or None when the format adds none beyond its float grid (F16, BF16, F32 ...) or is unknown.

    Round-to-nearest on a grid of step h leaves an error uniform in +-h/2 (variance h^2 / 12); h is
    the code step times the element's scale (8-bit floats: the ulp of its code). read(ref) reads
    a scale tensor as float."""
    import torch

    st = ref.storage
    if st is None or t.numel() == 0 or t.dim() != 2:
        return None
    w = t.to(torch.float64)  # (m, n)
    m, n = w.shape
    if st.kind.startswith("bitsandbytes "):
        return _bnb4_noise(st, w, read)
    gg = st.kind[len("gguf "):] if st.kind.startswith("gguf ") else None
    if gg is not None:
        spec = _GGUF_STEPS.get(gg)
        if spec is None or n % spec[0]:
            return None
        group, how, q = spec
        blocks = w.reshape(m, n // group, group)  # (m, n/g, g)
        if how == "amax":
            step = blocks.abs().amax(dim=2) / q  # (m, n/g)
        else:
            step = (blocks.amax(dim=2) - blocks.amin(dim=2)) / q  # (m, n/g)
        return float((step.square().mean() / 12.0).sqrt())
    full = torch.ones(1, 1, dtype=torch.float64)
    if st.scale is not None:
        s = read(st.scale)
        if not s.is_floating_point() or s.dtype in (torch.uint8,):
            return None
        s = s.to(torch.float64).reshape(_scale_grid(tuple(s.shape), m, n))  # (s0, s1)
        bm, bn = st.block
        full = s if s.shape in ((m, 1), (1, 1)) else \
            s.repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]  # (m, n)
        full = full / st.divisor
    if ref.dtype == "I8":
        step = full.expand(m, n)  # one code step per element
        return float((step.square().mean() / 12.0).sqrt())
    if ref.dtype not in _MANTISSA:
        return None
    mbits, bias = _MANTISSA[ref.dtype]
    codes = torch.where(full != 0, w / full, torch.zeros_like(w))  # (m, n) the 8-bit values
    _, e = torch.frexp(codes)  # |code| in [2^(e-1), 2^e)
    e = torch.clamp(e - 1, min=1 - bias)  # subnormals share the smallest normal's step
    ulp = torch.ldexp(full.expand(m, n), e - mbits)  # (m, n) code step x scale
    return float((ulp.square().mean() / 12.0).sqrt())
