"""PEFT LoRA adapter directories: config rules and per-tensor merging (never a whole model).

dW = (B @ A) * scaling with scaling = lora_alpha / r (or / sqrt(r) with use_rslora), per-module r
and alpha from rank_pattern / alpha_pattern, transposed for fan_in_fan_out (decided from the base
tensor's shape), DoRA magnitude rescaling, lora_bias, modules_to_save replacements.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

from ..errors import AdapterError
from ..types import LoraInfo, TensorRef
from .checkpoint import Checkpoint, _from_pickle_kind, _from_safetensors, _inside, _load_json

PREFIX = "base_model.model."
# init_lora_weights values that change the base model at initialisation
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "eva")
_LORA_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(?:\.(?!(?:weight|bias)$)(?P<adapter>[A-Za-z0-9_]+))?"
    r"(?:\.(?P<leaf>weight|bias))?$")


@dataclass
class Adapter:
    """Parsed adapter_config.json plus the index of its factor tensors per module."""

    path: str
    config: dict
    modules: Dict[str, Dict[str, TensorRef]] = field(default_factory=dict)  # module -> part -> ref
    replacements: Dict[str, TensorRef] = field(default_factory=dict)  # modules_to_save tensors
    ignored: Dict[str, str] = field(default_factory=dict)  # tensor -> reason

    def summary(self) -> dict:
        c = self.config
        return {"peft_type": c.get("peft_type"), "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")), "use_dora": bool(c.get("use_dora")),
                "target_modules": c.get("target_modules"),
                "rank_pattern": c.get("rank_pattern") or {},
                "alpha_pattern": c.get("alpha_pattern") or {},
                "modules_to_save": c.get("modules_to_save"),
                "n_lora_modules": len(self.modules)}

    def rank_alpha(self, module: str):
        """(r, alpha) for a module, honouring rank_pattern / alpha_pattern as PEFT matches them."""
        r = _pattern(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module,
                         self.config.get("lora_alpha", 8))
        return int(r), float(alpha)

    def scaling(self, module: str, r: int, alpha: float) -> float:
        if r <= 0:
            raise AdapterError(f"{self.path}: module {module!r} has rank {r}")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(d: str) -> Checkpoint:
    """Index a PEFT adapter directory; validate its config against its tensors."""
    cfg_path = os.path.join(d, "adapter_config.json")
    try:
        cfg = _load_json(_inside(d, "adapter_config.json", d))
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(str(exc))
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: not a JSON object")
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported "
                           f"(only LORA adapters can be merged per tensor)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"{cfg_path}: init_lora_weights={init!r} changes the base model at initialisation, so "
            f"this adapter is only valid against its residual base; convert it on save "
            f"(PEFT path_initial_model_for_weight_conversion) and scan the converted adapter")
    if cfg.get("loftq_config"):
        raise AdapterError(f"{cfg_path}: a LoftQ adapter is only valid against its quantised "
                           f"residual base; merge it with PEFT first")
    _check_numbers(cfg_path, cfg)
    files = [f for f in ("adapter_model.safetensors", "adapter_model.bin")
             if os.path.lexists(os.path.join(d, f))]
    if not files:
        raise AdapterError(f"{d}: adapter directory has no adapter_model.safetensors or .bin")
    f = _inside(d, files[0], d)
    if f.endswith(".safetensors"):
        ck = _from_safetensors(d, [f], "adapter")
    else:
        ck = _from_pickle_kind(d, [f], "adapter")
    ck.kind = "adapter"
    ad = Adapter(d, cfg)
    for name, ref in ck.refs.items():
        _index_tensor(ad, name, ref)
    _validate(ad)
    ck.adapter = ad
    return ck


def _positive(v, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return False
    return not integer or float(v).is_integer()


def _check_numbers(cfg_path: str, cfg: dict) -> None:
    """r, lora_alpha and their per-module patterns: finite positive numbers (r whole), valid
    regular-expression keys; the config comes from a stranger, PEFT's defaults are 8 and 8."""
    for key, integer in (("r", True), ("lora_alpha", False)):
        v = cfg.get(key, 8)
        if not _positive(v, integer):
            what = "a positive whole number" if integer else "a positive number"
            raise AdapterError(f"{cfg_path}: {key} must be {what}, got {v!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise AdapterError(f"{cfg_path}: {key} must map module patterns to numbers, "
                               f"got {type(pat).__name__}")
        for k, v in pat.items():
            if not _positive(v, integer):
                raise AdapterError(f"{cfg_path}: {key}[{k!r}] must be a positive "
                                   f"{'whole ' if integer else ''}number, got {v!r}")
            try:
                re.compile(rf"(.*\.)?({k})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterError(f"{cfg_path}: {key} key {k!r} is not a valid regular "
                                   f"expression ({exc})")


def _index_tensor(ad: Adapter, name: str, ref: TensorRef) -> None:
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    m = _LORA_KEY.match(key)
    if m:
        part = m.group("part")
        leaf = m.group("leaf")
        if part == "lora_B" and leaf == "bias":
            part = "lora_B_bias"
        ad.modules.setdefault(m.group("mod"), {})[part] = ref
        return
    if ".base_layer." in key:
        ad.ignored[name] = "copy of the base layer saved with the adapter"
        return
    if ".modules_to_save." in key:  # older PEFT layout: <mod>.modules_to_save.<adapter>.<leaf>
        mod, rest = key.split(".modules_to_save.", 1)
        key = mod + "." + rest.split(".", 1)[1]
    ad.replacements[key] = ref


def _validate(ad: Adapter) -> None:
    for mod, parts in ad.modules.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A")
        b = parts.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            raise AdapterError(f"{ad.path}: module {mod!r} has only one of its two LoRA factors")
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise AdapterError(f"{ad.path}: module {mod!r}: LoRA factors must be 2-D "
                               f"(A {list(a.shape)}, B {list(b.shape)})")
        r, _ = ad.rank_alpha(mod)
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{ad.path}: module {mod!r}: A {list(a.shape)} and B "
                               f"{list(b.shape)} disagree on the rank")
        if a.shape[0] != r:
            raise AdapterError(f"{ad.path}: module {mod!r}: tensors have rank {a.shape[0]} but the "
                               f"config (r / rank_pattern) says {r}")


def lora_info_for(ad: Adapter, module: str, base_shape) -> Optional[LoraInfo]:
    """LoraInfo for the module owning a base tensor, or None if the adapter does not touch it."""
    parts = ad.modules.get(module)
    if parts is None:
        return None
    emb = "lora_embedding_A" in parts
    a = parts["lora_embedding_A" if emb else "lora_A"]
    b = parts["lora_embedding_B" if emb else "lora_B"]
    r, alpha = ad.rank_alpha(module)
    if emb:  # dW = (B @ A)^T: (num_embeddings, dim)
        out_in = (a.shape[1], b.shape[0])
        transpose = True
    else:  # dW = B @ A: (out, in)
        out_in = (b.shape[0], a.shape[1])
        transpose = False
    base_shape = tuple(base_shape)
    if base_shape == out_in and (base_shape[::-1] != out_in or not ad.config.get("fan_in_fan_out")):
        fifo = False
    elif base_shape == out_in[::-1]:
        fifo = True  # base stored (in, out), e.g. GPT-2 Conv1D
    else:
        raise AdapterError(f"{ad.path}: module {module!r}: LoRA update has shape {list(out_in)} "
                           f"but the base tensor has shape {list(base_shape)}; an adapter of "
                           f"another base model?")
    return LoraInfo(a=a, b=b, rank=r, alpha=alpha, scaling=ad.scaling(module, r, alpha),
                    fan_in_fan_out=fifo != transpose, embedding=emb,
                    magnitude=parts.get("lora_magnitude_vector"))


def lora_bias_for(ad: Adapter, module: str) -> Optional[TensorRef]:
    parts = ad.modules.get(module)
    return None if parts is None else parts.get("lora_B_bias")


def merge_lora(w0, lora: LoraInfo, read):
    """Tuned weight W0 + dW (with DoRA when a magnitude is present), in float64.

    `read(ref)` loads a TensorRef. Returns a float64 tensor shaped like w0.
    """
    import torch

    w = w0.to(torch.float64)  # (out, in) or (in, out) when transposed storage
    a = read(lora.a).to(torch.float64)  # (r, in)
    b = read(lora.b).to(torch.float64)  # (out, r)
    dw = (b @ a) * lora.scaling  # (out, in)
    if lora.fan_in_fan_out:
        dw = dw.mT  # stored layout of the base
    if lora.magnitude is None:
        return w + dw
    mag = read(lora.magnitude).to(torch.float64)
    merged = w + dw
    if lora.embedding:
        # DoRA on embeddings: norm per embedding dimension (columns of the stored matrix)
        norm = merged.norm(dim=0)  # (dim,)
        return merged * (mag / norm)[None, :]
    rows = merged.mT if lora.fan_in_fan_out else merged  # (out, in)
    norm = rows.norm(dim=1)  # (out,)
    scaled = rows * (mag / norm)[:, None]
    return scaled.mT if lora.fan_in_fan_out else scaled
