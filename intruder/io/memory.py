"""Checkpoints that live in memory: a {name: tensor} state dict, a torch.nn.Module, a PEFT model.

Each becomes an ordinary `Checkpoint` whose TensorRefs point at a registry entry instead of a
file (path `<memory N: label>`), so pairing, the scan engine, compare / track and the rescaler
read it exactly as they read a file: `read_ref` and `open_checkpoint` look the path up here first.
A PEFT model is indexed like its saved adapter directory (the LoRA factors and modules_to_save
that `save_pretrained` would write), so it is merged per tensor by the same code as on disk.

Tensors are never modified: every read returns a CPU copy. The registry holds checkpoints weakly;
an entry lives as long as the caller keeps its Checkpoint.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AdapterError, CheckpointError, InputError
from ..types import CheckpointInfo, TensorRef
from .adapter import (
    BASE_CHANGING_INITS,
    Adapter,
    check_adapter_numbers,
    index_adapter_tensor,
    validate_adapter,
)
from .checkpoint import MEMORY as _REGISTRY
from .checkpoint import Checkpoint, tensor_table_sha256
from .safetensors_file import DTYPES

PREFIX = "<memory "
_TORCH_TO_ST = {v[1]: k for k, v in DTYPES.items()}
_COUNTER = itertools.count(1)
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.",
               ".lora_magnitude_vector")


class _Store:
    """The handle `read_ref` uses for a memory path: `.entries` and `.read(name)`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.entries = dict(tensors)

    def read(self, name: str) -> torch.Tensor:
        return self.entries[name].detach().to("cpu", copy=True)


@dataclass
class MemoryCheckpoint(Checkpoint):
    """A Checkpoint over tensors held in memory (no files)."""

    store: _Store | None = None

    def identity_files(self):
        return []  # no files: the identity is the tensors' names, dtypes and shapes

    def info(self, identity: bool = True) -> CheckpointInfo:
        """Identity for reports: names, dtypes and shapes (no file to hash)."""
        assert self.store is not None, "a memory checkpoint holds its tensors"
        total = sum(t.numel() * t.element_size() for t in self.store.entries.values())
        adapter = self.adapter.summary() if self.adapter is not None else None
        return CheckpointInfo(path=self.path, kind=self.kind, n_tensors=len(self.refs),
                              bytes=total, dtypes=tuple(sorted({r.dtype for r in self.refs.values()})),
                              fingerprint=tensor_table_sha256(self.refs).hexdigest()[:16],
                              adapter=adapter)


def is_memory_path(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX) and path.endswith(">")


def lookup(path: str) -> MemoryCheckpoint | None:
    """The registered checkpoint at a memory path, or None."""
    return _REGISTRY.get(path) if is_memory_path(path) else None


def handle(path: str) -> _Store | None:
    ck = lookup(path)
    if ck is None and is_memory_path(path):
        raise CheckpointError(f"{path}: the in-memory model is gone (keep a reference to it "
                              f"while it is being read)")
    return None if ck is None else ck.store


def _new(tensors: Mapping[str, torch.Tensor], label: str, kind: str,
         adapter: Adapter | None = None) -> MemoryCheckpoint:
    path = f"{PREFIX}{next(_COUNTER)}: {label}>"
    refs: dict[str, TensorRef] = {}
    kept = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise InputError(f"{label}: state dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{label}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_meta:
            raise InputError(f"{label}: tensor {name!r} is on the meta device (weights not "
                             f"loaded; offloaded or not materialised)")
        dt = _TORCH_TO_ST.get(str(t.dtype).replace("torch.", ""))
        if dt is None:
            raise InputError(f"{label}: tensor {name!r} has unsupported dtype {t.dtype} "
                             f"(quantised weights must be dequantised first)")
        refs[name] = TensorRef(path, name, tuple(t.shape), dt)
        kept[name] = t
    ck = MemoryCheckpoint(path=path, kind=kind, refs=refs, files=[], adapter=adapter,
                          store=_Store(kept))
    if adapter is not None:
        adapter.path = path
    _REGISTRY[path] = ck
    return ck


def from_state_dict(tensors: Mapping[str, Any], label: str = "state dict") -> MemoryCheckpoint:
    """A checkpoint over a {name: tensor} mapping (tensors are not copied until read)."""
    if not tensors:
        raise InputError(f"{label}: the state dict is empty")
    return _new(tensors, label, "memory")


def _label(model) -> str:
    cls = type(model).__name__
    src = getattr(getattr(model, "config", None), "name_or_path", "") or \
        getattr(model, "name_or_path", "")
    return f"{cls} {src}".strip() if isinstance(src, str) else cls


def is_peft_model(obj) -> bool:
    return hasattr(obj, "peft_config") and hasattr(obj, "get_base_model")


def _has_lora_layers(sd: Mapping[str, Any]) -> bool:
    return any(any(p in k for p in _LORA_PARTS) for k in sd)


def base_weights(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with PEFT's injected layers undone: `x.base_layer.weight` -> `x.weight`,
    LoRA factors and modules_to_save copies dropped (the untouched base model's tensors)."""
    out = {}
    for k, v in sd.items():
        if any(p in k for p in _LORA_PARTS) or ".modules_to_save." in k:
            continue
        k = k.replace(".base_layer.", ".").replace(".original_module.", ".")
        out[k] = v
    return out


def _strip_peft_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pre = "base_model.model."
    return {(k[len(pre):] if k.startswith(pre) else k): v for k, v in sd.items()}


def _merged_layers(model) -> bool:
    return any(bool(getattr(m, "merged_adapters", None)) for m in model.modules())


def from_module(model: torch.nn.Module, role: str = "tuned") -> MemoryCheckpoint:
    """A checkpoint over a module's state dict; a PEFT model as TUNED is indexed as its adapter.

    As BASE, a model with LoRA layers injected (e.g. the module a PeftModel wraps) gives its
    untouched base weights."""
    label = _label(model)
    if is_peft_model(model):
        if role == "tuned" and not _merged_layers(model):
            return from_peft(model)
        sd = _strip_peft_prefix(model.state_dict())
        if role == "base" and _merged_layers(model):
            raise InputError(f"{label}: its LoRA layers are merged into the weights, so the base "
                             f"weights are not available (unmerge_adapter() first)")
        # a merged PEFT model as TUNED: base_layer weights already hold W0 + dW
        return _new(base_weights(sd), f"{label} (merged)" if role == "tuned" else label, "memory")
    sd = model.state_dict()
    if _has_lora_layers(sd):
        if role == "tuned":
            raise InputError(f"{label}: has LoRA layers injected but is not a PeftModel; pass "
                             f"the PeftModel (or merge_and_unload() it)")
        if _merged_layers(model):
            raise InputError(f"{label}: its LoRA layers are merged into the weights, so the base "
                             f"weights are not available (unmerge_adapter() first)")
        sd = base_weights(sd)
    if not sd:
        raise InputError(f"{label}: the module has no parameters or buffers")
    return _new(sd, label, "memory")


def peft_config_dict(model) -> tuple[dict, str]:
    """The active adapter's config as adapter_config.json holds it."""
    name = getattr(model, "active_adapter", None) or "default"
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise InputError(f"{_label(model)}: {len(name)} adapters are active; activate one "
                             f"(set_adapter) to scan it")
        name = name[0]
    cfg = model.peft_config.get(name)
    if cfg is None:
        raise InputError(f"{_label(model)}: no adapter named {name!r}")
    d = cfg.to_dict()
    for k, v in list(d.items()):
        if isinstance(v, enum.Enum):
            d[k] = v.value
        elif isinstance(v, set):
            d[k] = sorted(v)
    return d, name


def from_peft(model) -> MemoryCheckpoint:
    """A PEFT model as its adapter: the tensors `save_pretrained` writes, merged per tensor."""
    from peft import get_peft_model_state_dict

    label = _label(model)
    cfg, name = peft_config_dict(model)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{label}: peft_type {cfg.get('peft_type')!r} is not supported (only "
                           f"LORA adapters can be merged per tensor)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{label}: init_lora_weights={init!r} changes the base model at "
                           f"initialisation; scan against its residual base")
    check_adapter_numbers(label, cfg)
    # save_embedding_layers=False: no hub lookup; embedding LoRA factors are kept all the same
    sd = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    ad = Adapter(label, cfg)
    ck = _new(sd, label, "adapter", ad)
    for n, ref in ck.refs.items():
        index_adapter_tensor(ad, n, ref)
    validate_adapter(ad)
    return ck


def as_checkpoint(obj, role: str = "tuned") -> Checkpoint | None:
    """Any in-memory input as a Checkpoint; None for a path-like (the caller opens it)."""
    if isinstance(obj, Checkpoint):
        return obj
    if isinstance(obj, torch.nn.Module):
        return from_module(obj, role)
    if isinstance(obj, Mapping):
        if role == "tuned" and _has_lora_layers(obj):
            raise InputError("state dict with LoRA factors: save it as an adapter directory "
                             "(with adapter_config.json) or pass the PeftModel")
        return from_state_dict(obj)
    return None
