"""GGUF checkpoints (llama.cpp) as BASE or TUNED, through the `gguf` package (optional extra).

- Tensors are read lazily from the memory-mapped file and dequantized to float with
  `gguf.quants` (F32, F16 and BF16 kept exact in their own dtype; Q8_0, Q4_0/1, Q5_0/1, the
  K-quants and every other type the installed `gguf` can dequantize, to float32).
- llama.cpp names (`blk.N.attn_q.weight`) are mapped to Hugging Face names with gguf's own
  tensor-name tables for the file's architecture (`model.layers.N.self_attn.q_proj.weight` for
  llama); the other spellings those tables know are kept as aliases, and pairing picks the one
  the other checkpoint uses.
- llama.cpp's converter reorders the rows of q_proj / k_proj per head for architectures whose
  rotary embedding it applies to interleaved pairs (llama and its relatives): row
  h*d + j*(d/2) + i of the Hugging Face matrix is stored as row h*d + 2i + j. That reorder is
  undone here (n_head / n_head_kv from the file's metadata); otherwise the left singular vectors
  of every q/k matrix come out permuted and match nothing of a Hugging Face base.
- Shapes are reported in PyTorch order (out, in): GGUF lists dimensions innermost first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError
from ..types import Storage, TensorRef
from .safetensors_file import check_regular_file

# architectures whose q/k rows convert_hf_to_gguf.py permutes (LlamaModel.permute and the
# models that reuse it); a GGUF converted from Mistral's own (non-HF) format is not permuted
PERMUTED_ARCHS = ("llama", "deci", "granite", "granitemoe")
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")
_HF_STYLE = re.compile(r"^model\.layers\.\d+\.|^model\.(embed_tokens|norm)$|^lm_head$")
_INT_TYPES = {"I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` package "
                              "(pip install 'intruder[gguf]')") from None
    return gguf


def _reader(path: str):
    gguf = _gguf()
    check_regular_file(path)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError,
            MemoryError) as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise CheckpointError(f"{path}: not a readable GGUF file ({msg})") from exc


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        if hasattr(f, "contents"):
            return f.contents()
        part = f.parts[f.data[0]]  # gguf < 0.11: decode the scalar or string by hand
        return bytes(part).decode("utf-8") if part.dtype == np.uint8 and \
            f.types and f.types[0].name == "STRING" else part[0].item()
    except Exception:  # noqa: BLE001 - a malformed field reads as absent
        return default


_DECODABLE: dict[int, bool] = {}


def decodable(qtype) -> bool:
    """Whether the installed gguf package can dequantize this GGML type."""
    gguf = _gguf()
    key = int(qtype)
    if key not in _DECODABLE:
        if qtype.name in ("F32", "F16", "BF16", "F64"):
            _DECODABLE[key] = True
        elif qtype.name in _INT_TYPES:
            _DECODABLE[key] = False
        else:
            size = gguf.GGML_QUANT_SIZES[qtype][1]
            try:
                gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
                _DECODABLE[key] = True
            except (NotImplementedError, ValueError, KeyError):
                _DECODABLE[key] = False
    return _DECODABLE[key]


def unpermute_rows(w, heads: int):
    """Undo convert_hf_to_gguf's per-head row reorder of a q/k projection (rows, ...):
    stored row h*d + 2i + j holds Hugging Face row h*d + j*(d/2) + i."""
    rows = w.shape[0]
    if heads < 1 or rows % (2 * heads):
        raise CheckpointError(f"q/k projection with {rows} rows cannot be split into {heads} "
                              f"rotary heads")
    rest = tuple(w.shape[1:])
    return w.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def permute_rows(w, heads: int):
    """What convert_hf_to_gguf does to q/k rows (the inverse of unpermute_rows)."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    return w.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


class GGUFFile:
    """Lazy access to the tensors of one GGUF file (names as stored)."""

    def __init__(self, path: str):
        self.path = path
        self.reader = _reader(path)
        self.entries = {t.name: t for t in self.reader.tensors}

    def read(self, name: str, storage: Storage | None = None):
        """One tensor as float (F16/BF16/F32 in their own dtype, others float32), PyTorch shape,
        q/k rows back in Hugging Face order when storage.heads says so."""
        import torch

        gguf = _gguf()
        t = self.entries[name]
        qt = t.tensor_type
        shape = tuple(int(d) for d in reversed(list(t.shape)))  # PyTorch order (out, in)
        try:
            if qt.name in ("F16", "F32", "F64"):
                arr = np.array(t.data, copy=True)
                out = torch.from_numpy(arr).reshape(shape)
            elif qt.name == "BF16":
                arr = np.array(t.data, copy=True).view(np.int16)
                out = torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
            else:
                with np.errstate(all="ignore"):  # a NaN / Inf decoded is the scan's to report
                    arr = gguf.quants.dequantize(t.data, qt)
                out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)
        except (ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({qt.name} {list(shape)}): "
                                  f"cannot be decoded ({str(exc)[:120]})") from exc
        if storage is not None and storage.heads:
            try:
                out = unpermute_rows(out, storage.heads).contiguous()
            except CheckpointError as exc:
                raise CheckpointError(f"{self.path}: tensor {name!r}: {exc}") from exc
        return out


def _name_tables(arch: str, n_blocks: int) -> dict[str, list[str]]:
    """GGUF base name (no .weight/.bias) -> Hugging Face spellings, from gguf's own tables."""
    gguf = _gguf()
    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if enum is None:
        return {}
    try:
        tmap = gguf.get_tensor_name_map(enum, max(n_blocks, 0))
    except Exception:  # noqa: BLE001 - an architecture gguf's tables do not cover: names kept
        return {}
    inv: dict[str, list[str]] = {}
    for hf, (_, gname) in tmap.mapping.items():
        if hf != gname and not hf.endswith("_no_perm"):
            inv.setdefault(gname, []).append(hf)
    return inv


def _hf_name(gname: str, tables: dict[str, list[str]]) -> tuple[str, tuple[str, ...]]:
    """(preferred Hugging Face name, every spelling) of a GGUF tensor name."""
    for suffix in (".weight", ".bias", ""):
        if suffix and not gname.endswith(suffix):
            continue
        stem = gname[: len(gname) - len(suffix)] if suffix else gname
        cands = tables.get(stem)
        if cands:
            names = [c + suffix for c in cands]
            best = next((c for c in cands if _HF_STYLE.search(c)), cands[0]) + suffix
            return best, tuple(dict.fromkeys([best] + names + [gname]))
    return gname, (gname,)


def _split_files(path: str, reader) -> list[str]:
    count = _field(reader, "split.count", 0) or 0
    m = _SPLIT.match(os.path.basename(path))
    if not count or int(count) <= 1 or not m:
        return [path]
    d = os.path.dirname(path)
    files = [os.path.join(d, f"{m.group(1)}-{i:05d}-of-{int(count):05d}.gguf")
             for i in range(1, int(count) + 1)]
    for f in files:
        if not os.path.exists(f):
            raise CheckpointError(f"{path}: split GGUF of {count} files, but {f} is missing")
    return files


class GGUFIndex(NamedTuple):
    """A GGUF checkpoint's index: what io/opener.py makes a Checkpoint of (kind "gguf")."""

    path: str
    refs: dict[str, TensorRef]
    files: list[str]
    metadata: dict[str, str]
    aliases: dict[str, tuple[str, ...]]


def open_gguf(path: str, files: Sequence[str] | None = None) -> GGUFIndex:
    """Index a GGUF checkpoint (one file, or every part of a split one) without reading data."""
    first = files[0] if files else path
    reader = _reader(first)
    if files is None:
        files = _split_files(path, reader)
        if files[0] != first:
            reader = _reader(files[0])
    arch = _field(reader, "general.architecture", "") or ""
    arch = arch if isinstance(arch, str) else ""
    n_blocks = int(_field(reader, f"{arch}.block_count", 0) or 0)
    n_head = int(_field(reader, f"{arch}.attention.head_count", 0) or 0)
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", 0) or 0) or n_head
    tables = _name_tables(arch, n_blocks)
    refs: dict[str, TensorRef] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    metadata = {"gguf.architecture": arch}
    for f in files:
        rd = reader if f == files[0] else _reader(f)
        for t in rd.tensors:
            name, spellings = _hf_name(t.name, tables)
            if name in refs:
                raise CheckpointError(f"{f}: tensor {t.name!r} maps to {name!r}, which "
                                      f"{os.path.basename(refs[name].path)} also holds")
            shape = tuple(int(d) for d in reversed(list(t.shape)))
            qt = t.tensor_type
            heads = 0
            if arch in PERMUTED_ARCHS and len(shape) >= 1:
                base = t.name.rsplit(".", 1)[0] if t.name.endswith((".weight", ".bias")) else t.name
                if base.endswith(".attn_q"):
                    heads = n_head
                elif base.endswith(".attn_k"):
                    heads = n_head_kv
            if decodable(qt):
                storage = Storage(f"gguf {qt.name}", heads=heads)
                dtype = qt.name
            else:
                storage, dtype = None, _INT_TYPES.get(qt.name, f"GGUF {qt.name}")
            refs[name] = TensorRef(f, t.name, shape, dtype, storage)
            if len(spellings) > 1:
                aliases[name] = spellings
    return GGUFIndex(path, refs, list(files), metadata, aliases)


def open_gguf_dir(d: str, paths: Sequence[str]) -> GGUFIndex:
    """A directory whose only weights are GGUF: one file, or the parts of one split file."""
    if len(paths) == 1:
        return open_gguf(paths[0])
    firsts = [p for p in paths if (m := _SPLIT.match(os.path.basename(p))) and m.group(2) == "00001"]
    if len(firsts) == 1:
        ck = open_gguf(firsts[0])
        if sorted(ck.files) == sorted(paths):
            return ck
    raise CheckpointError(f"{d}: holds {len(paths)} .gguf files ({os.path.basename(paths[0])}, "
                          f"...); give the one to audit as a file path")


def rename_to_match(ck, other_names) -> dict[str, TensorRef]:
    """ck's refs, each GGUF tensor under the alias that `other_names` uses (when exactly one
    does); others keep their preferred name."""
    other = set(other_names)
    out: dict[str, TensorRef] = {}
    for name, ref in ck.refs.items():
        new = name
        if name not in other:
            hits = [a for a in ck.aliases.get(name, ()) if a in other]
            if len(hits) == 1:
                new = hits[0]
        if new in out:
            new = name
        out[new] = ref
    return out
