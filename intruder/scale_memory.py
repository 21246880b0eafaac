"""Rescaling intruder dimensions in memory: a model or state dict in, a rescaled copy out.

The same per-tensor computation as `intruder scale` (intruder.intervene): the intruders' top-k
triplets recomputed from Wt in float64 and checked against the report's singular values,
W' = Wt + (alpha - 1) * sum_j sigma_j u_j v_j^T, cast to the tensor's dtype. A PEFT model is
first merged per tensor in float64 exactly as `intruder scale` merges its adapter directory
(LoRA deltas, lora_bias, modules_to_save), so for a model held in its stored dtype the result
equals the written checkpoint tensor for tensor. A plain module goes through intruder.inplace (the
in-place rescaler of the sweep) on a copy. Inputs are never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from .errors import AdapterError, InputError, ReportError
from .inplace import InPlaceRescaler
from .intervene import (
    LayerIntruders,
    Source,
    intruder_component,
    rescale,
    select_intruders,
)
from .io.adapter import lora_bias_for, lora_info_for, merge_lora
from .io.checkpoint import Checkpoint, read_ref
from .io.memory import as_checkpoint, from_module, from_peft, is_peft_model
from .io.pairing import _align
from .types import ScanReport


def _check_finite(w: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(w).all():
        from .errors import NonFiniteError

        raise NonFiniteError(f"merged tensor {name!r} contains NaN or Inf")
    return w


def _scaled(wt: torch.Tensor, sel: LayerIntruders | None, alpha: float, dtype: torch.dtype,
            device, where: str) -> torch.Tensor:
    """Wt (any dtype, e.g. a float64 merge) with its intruders rescaled, in `dtype`."""
    if sel is None:
        return wt.to(dtype)
    comp = intruder_component(wt, sel, device, where=where)
    return rescale(wt, comp, alpha).to(dtype)


def _full(ck: Checkpoint, sel: dict[str, LayerIntruders], alpha: float,
          device) -> dict[str, torch.Tensor]:
    """name -> new tensor for every tensor of a full model that carries intruders."""
    mapping = _align(list(sel), list(ck.refs))
    missing = [n for n in sel if n not in mapping]
    if missing:
        raise ReportError(f"layer {missing[0]!r} of the scan report (and {len(missing) - 1} more) "
                          f"matches no tensor of {ck.path}; the report belongs to another model")
    out = {}
    for layer, s in sel.items():
        name = mapping[layer]
        wt = read_ref(ck.refs[name])
        out[name] = _scaled(wt, s, alpha, wt.dtype, device, f"{ck.path}: {name!r}")
    return out


def _peft(base_ck: Checkpoint, ad_ck: Checkpoint, sel: dict[str, LayerIntruders], alpha: float,
          device) -> dict[str, torch.Tensor]:
    """base name -> merged (and rescaled) tensor for every tensor the adapter changes."""
    sources = _adapter_sources(base_ck, ad_ck, sel)
    out = {}
    for name, src in sources.items():
        if src.kind == "raw" and src.intruders is None:
            continue
        dtype = getattr(torch, _dtype_name(base_ck, name, src))
        where = f"{ad_ck.path}: {name!r}"
        if src.kind == "bias":
            b0 = read_ref(src.ref).to(torch.float64)  # (out,)
            lb = read_ref(src.bias).to(torch.float64)  # (out,)
            out[name] = (b0 + lb * src.scaling).to(dtype)
        elif src.kind == "lora":
            wt = _check_finite(merge_lora(read_ref(src.ref), src.lora, read_ref), name)  # float64
            out[name] = _scaled(wt, src.intruders, alpha, dtype, device, where)
        else:  # a modules_to_save replacement
            wt = read_ref(src.ref)
            out[name] = _scaled(wt, src.intruders, alpha, wt.dtype, device, where)
    return out


def _adapter_sources(base_ck: Checkpoint, ad_ck: Checkpoint,
                     sel: dict[str, LayerIntruders]) -> dict[str, Source]:
    """Base tensor name -> how the merged model's tensor is made (as `intruder scale` merges an
    adapter: LoRA deltas, lora_B biases, modules_to_save replacements); untouched ones left out."""
    ad = ad_ck.adapter
    sources: dict[str, Source] = {}
    base_mods = [n[: -len(".weight")] for n in base_ck.refs if n.endswith(".weight")]
    mod_map = _align(base_mods, list(ad.modules))  # base module -> adapter module
    lost = sorted(set(ad.modules) - set(mod_map.values()))
    if lost:
        raise AdapterError(f"{ad.path}: LoRA module {lost[0]!r} (and {len(lost) - 1} more) matches "
                           f"no tensor of {base_ck.path}")
    for bmod, amod in mod_map.items():
        wname = bmod + ".weight"
        info = lora_info_for(ad, amod, base_ck.refs[wname].shape)
        sources[wname] = Source("lora", base_ck.refs[wname], lora=info)
        bias = lora_bias_for(ad, amod)
        if bias is not None:
            if bmod + ".bias" not in base_ck.refs:
                raise AdapterError(f"{ad.path}: module {amod!r} has a lora_B bias but the base "
                                   f"has no {bmod + '.bias'!r} to add it to")
            sources[bmod + ".bias"] = Source("bias", base_ck.refs[bmod + ".bias"], bias=bias,
                                             scaling=info.scaling)
    for bname, rname in _align(list(base_ck.refs), list(ad.replacements)).items():
        sources[bname] = Source("replace", ad.replacements[rname])
    for name, s in sel.items():
        if name not in sources or sources[name].kind not in ("lora", "replace"):
            raise ReportError(f"layer {name!r} of the scan report is not changed by the adapter "
                              f"{ad.path}; the report belongs to another pair")
        sources[name].intruders = s
    return sources


def _dtype_name(base_ck: Checkpoint, name: str, src) -> str:
    from .io.safetensors_file import DTYPES

    ref = base_ck.refs.get(name, src.ref)
    return DTYPES[ref.dtype][1]


def _load_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into a module's parameters / buffers by state-dict name."""
    own = model.state_dict(keep_vars=True)
    unknown = [n for n in tensors if n not in own]
    if unknown:
        raise ReportError(f"tensor {unknown[0]!r} has no place in the {type(model).__name__} "
                          f"(and {len(unknown) - 1} more)")
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t.to(own[n].device))


def rescale_model(obj, report: ScanReport, alpha: float, epsilon: float | None = None,
                  device: str | None = None):
    """A rescaled copy of a state dict, a module or a PEFT model (merged: a plain model).

    Returns a dict for a state dict, else a torch module (for a transformers model, one that
    `lm_eval.models.huggingface.HFLM(pretrained=...)` accepts). A plain module is rescaled by
    intruder.inplace.InPlaceRescaler on a copy."""
    import math

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"alpha must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    sel = select_intruders(report, epsilon)
    dev = torch.device(device) if device else None
    if isinstance(obj, torch.nn.Module) and is_peft_model(obj):
        base_ck = from_module(obj, "base")
        ad_ck = from_peft(obj)
        # the merge is rescaled in float64 before rounding, as `intruder scale` does (the in-place
        # rescaler starts from stored weights, so it would round the merge first)
        new = _peft(base_ck, ad_ck, sel, alpha, dev)
        model = copy.deepcopy(obj).unload()  # the base model with the LoRA layers removed
        _load_into(model, new)
        return model
    ck = as_checkpoint(obj, "tuned")
    if ck is None or ck.kind == "adapter":
        raise InputError(f"rescale: expected a state dict, a torch.nn.Module or a PEFT model, "
                         f"got {type(obj).__name__} (for a checkpoint on disk use "
                         f"`intruder scale`)")
    if isinstance(obj, torch.nn.Module):
        model = copy.deepcopy(obj)
        # intruder.inplace's rescaler, left at alpha: its kept originals go with it
        InPlaceRescaler(model, report, epsilon=epsilon).set_alpha(alpha, measure=False)
        return model
    out = dict(obj)
    out.update(_full(ck, sel, alpha, dev))
    return out
