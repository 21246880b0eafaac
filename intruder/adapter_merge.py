"""A PEFT adapter merged into its base tensor by tensor, the one merge every rescaling path uses.

`intruder scale` on an adapter (intruder.intervene.scale_checkpoint), the in-memory alpha sweep
(intruder.sweep_exec) and `intruder.rescale` of a PeftModel (intruder.inplace.rescaled_copy) all
start from the same float64 matrices: W0 + scaling * B A per LoRA module (DoRA included,
intruder.io.adapter.merge_lora), b0 + scaling * lora_B.bias per biased module, and the
adapter's modules_to_save tensors in place of BASE's. Also the tensor reader the writer uses
(one parsed header per checkpoint side).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import AdapterError, NonFiniteError, ReportError
from .io import read_ref
from .io.adapter import lora_bias_for, lora_info_for, merge_lora
from .io.checkpoint import Checkpoint
from .io.pairing import _align
from .io.safetensors_file import DTYPES, SafetensorsFile
from .io.writer import TensorSpec, tensor_bytes
from .types import LoraInfo, TensorRef

if TYPE_CHECKING:  # intervene imports this module
    from .intervene import LayerIntruders


@dataclass
class Source:
    """How one output tensor is produced."""

    kind: str  # raw | lora | bias | replace
    ref: TensorRef  # raw: the tensor; lora/bias: the base tensor; replace: the adapter's tensor
    lora: LoraInfo | None = None
    bias: TensorRef | None = None  # lora_B.bias (kind == bias)
    scaling: float = 1.0
    intruders: LayerIntruders | None = None


class Reader:
    """Reads tensors (or their raw bytes) keeping one parsed header per checkpoint side."""

    def __init__(self) -> None:
        self.caches: dict[str, dict] = {}

    def _cache(self, ref: TensorRef) -> dict:
        return self.caches.setdefault(os.path.dirname(os.path.abspath(ref.path)), {})

    def read(self, ref: TensorRef) -> torch.Tensor:
        return read_ref(ref, self._cache(ref))

    def raw(self, ref: TensorRef):
        if not ref.path.endswith(".safetensors"):
            return tensor_bytes(self.read(ref))
        cache = self._cache(ref)
        h = cache.get(ref.path)
        if h is None:
            cache.clear()
            h = cache[ref.path] = SafetensorsFile(ref.path)
        return h.raw_bytes(ref.name)


def torch_dtype(st_dtype: str) -> torch.dtype:
    return getattr(torch, DTYPES[st_dtype][1])


def adapter_sources(base_ck: Checkpoint, tuned_ck: Checkpoint, sel: dict[str, LayerIntruders]
                    ) -> tuple[dict[str, Source], dict[str, TensorSpec], list[TensorSpec]]:
    """Every BASE tensor, with the adapter's LoRA deltas, biases and replacements attached (the
    merged model, tensor by tensor), plus the plan's overrides (replaced tensors) and extra
    tensors (new modules, e.g. a classification head, added as they are)."""
    ad = tuned_ck.adapter
    if ad is None:
        raise AdapterError(f"{tuned_ck.path}: not a PEFT adapter, so there is nothing to merge")
    sources = {n: Source("raw", r) for n, r in base_ck.refs.items()}
    overrides: dict[str, TensorSpec] = {}
    extra: list[TensorSpec] = []
    base_mods = [n[: -len(".weight")] for n in base_ck.refs if n.endswith(".weight")]
    mod_map = _align(base_mods, list(ad.modules))  # base module -> adapter module
    lost = sorted(set(ad.modules) - set(mod_map.values()))
    if lost:
        raise AdapterError(f"{ad.path}: LoRA module {lost[0]!r} (and {len(lost) - 1} more) matches "
                           f"no tensor of {base_ck.path}; the merged model would not be the "
                           f"fine-tuned one")
    for bmod, amod in mod_map.items():
        wname = bmod + ".weight"
        info = lora_info_for(ad, amod, base_ck.refs[wname].shape)
        assert info is not None  # amod is one of the adapter's modules
        sources[wname] = Source("lora", base_ck.refs[wname], lora=info)
        bias = lora_bias_for(ad, amod)
        if bias is not None:
            bname = bmod + ".bias"
            if bname not in base_ck.refs:
                raise AdapterError(f"{ad.path}: module {amod!r} has a lora_B bias but the base "
                                   f"has no {bname!r} to add it to")
            sources[bname] = Source("bias", base_ck.refs[bname], bias=bias, scaling=info.scaling)
    rep_map = _align(list(base_ck.refs), list(ad.replacements))
    for bname, rname in rep_map.items():
        ref = ad.replacements[rname]
        sources[bname] = Source("replace", ref)
        overrides[bname] = TensorSpec(bname, ref.dtype, tuple(ref.shape))
    for rname in sorted(set(ad.replacements) - set(rep_map.values())):
        ref = ad.replacements[rname]
        sources[rname] = Source("replace", ref)
        extra.append(TensorSpec(rname, ref.dtype, tuple(ref.shape)))
    for name, s in sel.items():
        if name not in sources or sources[name].kind not in ("lora", "replace"):
            raise ReportError(f"layer {name!r} of the scan report is not changed by the adapter "
                              f"{ad.path}; the report belongs to another pair")
        sources[name].intruders = s
    return sources, overrides, extra


class AdapterMerge:
    """A PEFT adapter TUNED merged into BASE tensor by tensor, exactly as `scale_checkpoint`
    writes it: LoRA deltas W0 + scaling * B A in float64 (DoRA included), lora_B biases added,
    modules_to_save replacements applied. The writer, the in-memory sweep and intruder.rescale
    all merge through it, so their alphas start from the same float64 matrices."""

    def __init__(self, base_ck: Checkpoint, tuned_ck: Checkpoint,
                 sel: dict[str, LayerIntruders]):
        self.sources, self.overrides, self.extra = adapter_sources(base_ck, tuned_ck, sel)
        self.checkpoints = (base_ck, tuned_ck)  # in-memory ones are registered while they live
        self.reader = Reader()

    def changed(self) -> list[str]:
        """Names of the tensors the merge computes (LoRA-changed weights, biases); replacements
        are the adapter's own tensors."""
        return [n for n, s in self.sources.items() if s.kind in ("lora", "bias")]

    def exact(self, name: str) -> torch.Tensor | None:
        """The float64 merged matrix of a LoRA-changed weight (before rounding to its dtype);
        None for a tensor that is stored as it is (raw, replaced, a bias)."""
        src = self.sources.get(name)
        if src is None or src.kind != "lora":
            return None
        return merged_lora(src, self.reader, name)

    def stored(self, name: str) -> torch.Tensor:
        """One tensor of the merged model as its checkpoint stores it (in its dtype)."""
        src = self.sources[name]
        dtype = torch_dtype(src.ref.dtype)
        if src.kind == "lora":
            return merged_lora(src, self.reader, name).to(dtype)
        if src.kind == "bias":
            return merged_bias(src, self.reader, dtype)
        return self.reader.read(src.ref)


def merged_lora(src: Source, reader: Reader, name: str) -> torch.Tensor:
    """W0 + scaling * B A of a LoRA source, float64, checked finite."""
    assert src.lora is not None
    return check_finite(merge_lora(reader.read(src.ref), src.lora, reader.read), name)


def merged_bias(src: Source, reader: Reader, dtype: torch.dtype) -> torch.Tensor:
    """b0 + scaling * lora_B.bias, summed in float64, in `dtype`."""
    assert src.bias is not None
    b0 = reader.read(src.ref).to(torch.float64)  # (out,)
    lb = reader.read(src.bias).to(torch.float64)  # (out,)
    return (b0 + lb * src.scaling).to(dtype)


def check_finite(w: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(w).all():
        raise NonFiniteError(f"merged tensor {name!r} contains NaN or Inf")
    return w


__all__ = ["AdapterMerge", "Reader", "Source", "adapter_sources", "check_finite", "merged_bias",
           "merged_lora", "torch_dtype"]
