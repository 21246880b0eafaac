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

from ..errors import AdapterError
from ..types import LoraInfo, TensorRef
from .checkpoint import Checkpoint, from_pickle_kind, from_safetensors, inside_dir, load_json
from .pattern import KeyTable, LinearPattern, PatternError, peft_key_pattern

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
    modules: dict[str, dict[str, TensorRef]] = field(default_factory=dict)  # module -> part -> ref
    replacements: dict[str, TensorRef] = field(default_factory=dict)  # modules_to_save tensors
    ignored: dict[str, str] = field(default_factory=dict)  # tensor -> reason
    # rank_pattern / alpha_pattern keys compiled for linear-time matching (pattern.py)
    patterns: dict[str, KeyTable] = field(default_factory=dict, repr=False)
    _rank_alpha: dict[str, tuple] = field(default_factory=dict, repr=False)
    # which tensor each (module, part) came from, and the adapter name in its key
    _sources: dict[tuple, str] = field(default_factory=dict, repr=False)
    _names: dict[object, str] = field(default_factory=dict, repr=False)

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
        """(r, alpha) for a module, honouring rank_pattern / alpha_pattern as PEFT matches them
        (the first key, in config order, for which re.match(rf"(.*\\.)?({key})$", module))."""
        got = self._rank_alpha.get(module)
        if got is None:
            if not self.patterns:
                self.patterns = compile_patterns(self.path, self.config)
            r = _pattern(self.config.get("rank_pattern") or {}, self.patterns["rank_pattern"],
                         module, self.config.get("r", 8))
            alpha = _pattern(self.config.get("alpha_pattern") or {}, self.patterns["alpha_pattern"],
                             module, self.config.get("lora_alpha", 8))
            got = self._rank_alpha[module] = (int(r), float(alpha))
        return got

    def scaling(self, module: str, r: int, alpha: float) -> float:
        if r <= 0:
            raise AdapterError(f"{self.path}: module {module!r} has rank {r}")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern(values: dict, table: KeyTable, module: str, default):
    key = table.first(module)
    return default if key is None else values[key]


def compile_patterns(where: str, cfg: dict) -> dict[str, KeyTable]:
    """{'rank_pattern': KeyTable, 'alpha_pattern': KeyTable}; a key that is not a regular
    expression, or needs a construct without a linear-time match, is refused."""
    out: dict[str, KeyTable] = {}
    for name in ("rank_pattern", "alpha_pattern"):
        def compile_key(k: str, name: str = name) -> LinearPattern:
            try:
                re.compile(rf"(.*\.)?({k})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterError(f"{where}: {name} key {k!r} is not a valid regular "
                                   f"expression ({exc})") from exc
            try:
                return peft_key_pattern(k)
            except PatternError as exc:
                raise AdapterError(f"{where}: {name} key {k!r} is refused: {exc} (keys are "
                                   f"matched in time linear in the module name, without "
                                   f"back-references, look-around, atomic groups or flags)") from exc

        out[name] = KeyTable(cfg.get(name) or {}, compile_key)
    return out


def open_adapter(d: str) -> Checkpoint:
    """Index a PEFT adapter directory; validate its config against its tensors."""
    cfg_path = os.path.join(d, "adapter_config.json")
    try:
        cfg = load_json(inside_dir(d, "adapter_config.json", d))
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(str(exc)) from exc
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
    patterns = check_adapter_numbers(cfg_path, cfg)
    files = [f for f in ("adapter_model.safetensors", "adapter_model.bin")
             if os.path.lexists(os.path.join(d, f))]
    if not files:
        raise AdapterError(f"{d}: adapter directory has no adapter_model.safetensors or .bin")
    f = inside_dir(d, files[0], d)
    if f.endswith(".safetensors"):
        ck = from_safetensors(d, [f], "adapter")
    else:
        ck = from_pickle_kind(d, [f], "adapter")
    ck.kind = "adapter"
    ad = Adapter(d, cfg, patterns=patterns)
    for name, ref in ck.refs.items():
        index_adapter_tensor(ad, name, ref)
    validate_adapter(ad)
    ck.adapter = ad
    return ck


def _positive(v, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return False
    return not integer or float(v).is_integer()


def check_adapter_numbers(cfg_path: str, cfg: dict) -> dict[str, KeyTable]:
    """r, lora_alpha and their per-module patterns: finite positive numbers (r whole), valid
    regular-expression keys; the config comes from a stranger, PEFT's defaults are 8 and 8. Also
    the switches that decide whether a per-tensor merge can equal PEFT's (use_dora,
    trainable_token_indices). Returns the compiled pattern keys."""
    if cfg.get("trainable_token_indices"):
        raise AdapterError(
            f"{cfg_path}: trainable_token_indices: this adapter replaces rows of a token "
            f"embedding, which is not merged per tensor here; merge it with PEFT "
            f"(merge_and_unload) and scan the merged model")
    if cfg.get("use_dora") not in (None, True, False):
        raise AdapterError(f"{cfg_path}: use_dora must be true or false, got "
                           f"{cfg.get('use_dora')!r}")
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
    return compile_patterns(cfg_path, cfg)


def index_adapter_tensor(ad: Adapter, name: str, ref: TensorRef) -> None:
    """File one adapter tensor: a LoRA factor (A, B, B's bias, DoRA magnitude) under its module,
    a modules_to_save replacement, or an ignored copy; duplicates and mixed adapters refused."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if ".token_adapter." in key or key.endswith("trainable_tokens_delta"):
        raise AdapterError(f"{ad.path}: tensor {name!r} holds trainable-token rows of an "
                           f"embedding, which are not merged per tensor here; merge the adapter "
                           f"with PEFT (merge_and_unload) and scan the merged model")
    m = _LORA_KEY.match(key)
    if m:
        part = m.group("part")
        leaf = m.group("leaf")
        if part == "lora_B" and leaf == "bias":
            part = "lora_B_bias"
        mod = m.group("mod")
        if part == "lora_magnitude_vector" and not ad.config.get("use_dora", False):
            # PEFT builds no magnitude when use_dora is false and drops these on loading
            ad.ignored[name] = "DoRA magnitude, but the config says use_dora: false (as PEFT)"
            return
        slot = (mod, part)
        if slot in ad._sources:
            raise AdapterError(f"{ad.path}: tensors {ad._sources[slot]!r} and {name!r} are two "
                               f"copies of the same LoRA factor (another adapter's factors saved "
                               f"in the same file?); which one PEFT would load is unclear, so "
                               f"the adapter is refused")
        adapter_name = m.group("adapter")
        if ad._names and adapter_name not in ad._names:
            other, example = next(iter(ad._names.items()))
            raise AdapterError(f"{ad.path}: tensor {name!r} belongs to adapter "
                               f"{adapter_name or 'default'!r} but {example!r} to "
                               f"{other or 'default'!r}; one file must hold one adapter")
        ad._names.setdefault(adapter_name, name)
        ad._sources[slot] = name
        ad.modules.setdefault(mod, {})[part] = ref
        return
    if ".base_layer." in key:
        ad.ignored[name] = "copy of the base layer saved with the adapter"
        return
    if ".modules_to_save." in key:  # older PEFT layout: <mod>.modules_to_save.<adapter>.<leaf>
        mod, rest = key.split(".modules_to_save.", 1)
        key = mod + "." + rest.split(".", 1)[1]
    ad.replacements[key] = ref


def validate_adapter(ad: Adapter) -> None:
    """Every module has both factors, 2-D, of one rank, the config's; DoRA magnitudes present
    when the config asks for DoRA and of the right length."""
    dora = bool(ad.config.get("use_dora", False))
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
        mag = parts.get("lora_magnitude_vector")
        if dora and mag is None:
            raise AdapterError(f"{ad.path}: the config says use_dora: true but module {mod!r} "
                               f"has no lora_magnitude_vector tensor; merged as plain LoRA it "
                               f"would differ from PEFT's DoRA merge")
        if mag is not None and tuple(mag.shape) != (b.shape[0],):
            raise AdapterError(f"{ad.path}: tensor {ad._sources[(mod, 'lora_magnitude_vector')]!r}"
                               f": DoRA magnitude has shape {list(mag.shape)}, but module "
                               f"{mod!r} has {b.shape[0]} output features (lora_B "
                               f"{list(b.shape)})")
        bias = parts.get("lora_B_bias")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise AdapterError(f"{ad.path}: tensor {ad._sources[(mod, 'lora_B_bias')]!r}: "
                               f"lora_B bias has shape {list(bias.shape)}, but module {mod!r} "
                               f"has {b.shape[0]} output features")


def lora_info_for(ad: Adapter, module: str, base_shape) -> LoraInfo | None:
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


def lora_bias_for(ad: Adapter, module: str) -> TensorRef | None:
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
