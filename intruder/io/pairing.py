"""Pair base and tuned tensors by name (never by position) and choose which ones to scan."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PairingError
from ..types import LayerPair, TensorRef
from .adapter import lora_info_for
from .checkpoint import Checkpoint
from .dequant import unusable
from .gguf import rename_to_match
from .safetensors_file import gc_paused

PEFT_PREFIX = "base_model.model."
# 2-D weights that are not linear projections: skipped unless --include selects them. A name
# component equal to one of these, or a component before the last made of word characters that
# contains "norm" or starts with "ln_" (checked per component: a header may hold a million names)
_NOT_LINEAR_PARTS = frozenset((
    "embed_tokens", "embed_positions", "embedding", "embeddings", "word_embeddings",
    "position_embeddings", "token_type_embeddings", "wte", "wpe", "shared", "lm_head", "embed_out",
    "output_embeddings"))
_WORD = re.compile(r"\w+")


def _not_linear(name: str) -> bool:
    parts = name.split(".")
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if part in _NOT_LINEAR_PARTS:
            return True
        if i < last and ("norm" in part or (part.startswith("ln_") and len(part) > 3)) \
                and _WORD.fullmatch(part):
            return True
    return False


@dataclass(frozen=True)
class Pairing:
    pairs: tuple[LayerPair, ...]
    unpaired_base: tuple[str, ...]  # selected base tensors with no tuned counterpart
    unpaired_tuned: tuple[str, ...]  # selected tuned tensors with no base counterpart
    skipped: tuple[tuple[str, str], ...]  # (name, reason) for paired tensors not scanned


def normalise(name: str) -> str:
    """Canonical tensor name: PEFT's wrapper prefix removed."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def is_default_target(name: str, shape) -> bool:
    """Linear-layer weights: 2-D tensors named *.weight that are not embeddings, heads or norms."""
    return len(shape) == 2 and name.endswith(".weight") and not _not_linear(name)


def select(name: str, shape, include: str | None, exclude: str | None) -> str | None:
    """None if the tensor is scanned, else the reason it is not."""
    if len(shape) == 2 and 0 in tuple(shape):
        return "empty matrix (a dimension is 0)"
    if exclude and re.search(exclude, name):
        return "excluded by --exclude"
    if include and re.search(include, name):
        if len(shape) != 2:
            return f"selected by --include but {len(shape)}-D (only matrices can be scanned)"
        return None
    if is_default_target(name, shape):
        return None
    if len(shape) != 2:
        return "not a matrix"
    return "embedding, head or norm (select with --include)"


def _align(base_names: list[str], tuned_names: list[str]) -> dict[str, str]:
    """base name -> tuned name. Exact match first; then names that differ only by one leading
    component (e.g. 'transformer.h.0...' vs 'h.0...'), if that match is unique.

    Linear in the number of names (sets and dicts only): a header may hold a million tensors."""
    tuned_set = set(tuned_names)
    out = {n: n for n in base_names if n in tuned_set}
    used_t = set(out)  # tuned names already taken (equal to their base names so far)
    rest_b = [n for n in base_names if n not in out]
    rest_t = [n for n in tuned_names if n not in used_t]
    if not rest_b or not rest_t:
        return out
    for strip_base in (True, False):
        src, dst = (rest_b, rest_t) if strip_base else (rest_t, rest_b)
        dst_set = set(dst)
        cand: dict[str, list[str]] = {}
        for n in src:
            if "." in n:
                short = n.split(".", 1)[1]
                if short in dst_set:
                    cand.setdefault(short, []).append(n)
        for short, longs in cand.items():
            if len(longs) != 1:
                continue
            b, t = (longs[0], short) if strip_base else (short, longs[0])
            if b not in out and t not in used_t:
                out[b] = t
                used_t.add(t)
    return out


def pair_checkpoints(base: Checkpoint, tuned: Checkpoint, include: str | None = None,
                     exclude: str | None = None) -> Pairing:
    """Pair every selected base matrix with its tuned counterpart (full tensor or LoRA factors).
    Linear in the number of tensors."""
    with gc_paused():
        return _pair_checkpoints(base, tuned, include, exclude)


def _pair_checkpoints(base: Checkpoint, tuned: Checkpoint, include: str | None,
                      exclude: str | None) -> Pairing:
    base_refs, tuned_refs = _gguf_names(base, tuned)
    if tuned.kind == "adapter":
        return _pair_adapter(base, tuned, include, exclude, base_refs)
    tuned_refs = {normalise(n): r for n, r in tuned_refs.items()}
    mapping = _align(list(base_refs), list(tuned_refs))
    if not mapping:
        raise PairingError(f"{base.path} and {tuned.path} have no tensor names in common "
                           f"(base e.g. {_example(base.refs)}, tuned e.g. {_example(tuned_refs)})")
    pairs, skipped, unpaired_base = [], [], []
    for name, ref in base_refs.items():
        reason = select(name, ref.shape, include, exclude)
        t_name = mapping.get(name)
        if t_name is None:
            if reason is None:
                unpaired_base.append(name)
            continue
        t_ref = tuned_refs[t_name]
        if reason is None:
            reason = _unusable(ref, t_ref)
        if reason is not None:
            skipped.append((name, reason))
            continue
        _check_shapes(base, tuned, ref, t_ref)
        pairs.append(LayerPair(name=name, base=ref, tuned=t_ref))
    mapped_t = set(mapping.values())
    unpaired_tuned = [n for n, r in tuned_refs.items()
                      if n not in mapped_t and select(n, r.shape, include, exclude) is None]
    return Pairing(tuple(pairs), tuple(unpaired_base), tuple(unpaired_tuned), tuple(skipped))


def _gguf_names(base: Checkpoint, tuned: Checkpoint):
    """Both sides' refs, a GGUF side's tensors named as the other side names them."""
    base_refs, tuned_refs = base.refs, tuned.refs
    if base.kind == "gguf" and tuned.kind != "gguf":
        other = list(tuned.refs) + [normalise(n) for n in tuned.refs]
        if tuned.kind == "adapter" and tuned.adapter is not None:
            other += [m + ".weight" for m in tuned.adapter.modules]
        base_refs = rename_to_match(base, other)
    elif tuned.kind == "gguf" and base.kind != "gguf":
        tuned_refs = rename_to_match(tuned, base.refs)
    return base_refs, tuned_refs


def _unusable(*refs: TensorRef) -> str | None:
    for side, ref in zip(("base", "tuned"), refs):
        why = unusable(ref)
        if why is not None:
            return f"{side}: {why}"
    return None


def _pair_adapter(base: Checkpoint, tuned: Checkpoint, include, exclude,
                  base_refs: dict[str, TensorRef] | None = None) -> Pairing:
    base_refs = base.refs if base_refs is None else base_refs
    ad = tuned.adapter
    assert ad is not None, "an adapter checkpoint holds its Adapter"
    modules = dict(ad.modules)
    repl = dict(ad.replacements)
    # map adapter module paths / replacement names onto base names
    mod_map = _align([n[: -len(".weight")] for n in base_refs if n.endswith(".weight")],
                     list(modules))
    rep_map = _align(list(base_refs), list(repl))
    if not mod_map and not rep_map:
        raise PairingError(f"{tuned.path}: none of the adapter's {len(modules)} modules matches a "
                           f"tensor of {base.path} (adapter e.g. {_example(modules)}, base e.g. "
                           f"{_example(base_refs)}); an adapter of another model?")
    pairs, skipped = [], []
    for name, ref in base_refs.items():
        reason = select(name, ref.shape, include, exclude)
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        a_mod = mod_map.get(mod) if mod is not None else None
        r_name = rep_map.get(name)
        touched = a_mod is not None or r_name is not None
        if reason is None:
            reason = _unusable(ref, repl[r_name]) if r_name is not None else _unusable(ref)
        if reason is not None:
            if touched:
                skipped.append((name, reason))
            continue
        if r_name is not None:
            t_ref = repl[r_name]
            _check_shapes(base, tuned, ref, t_ref)
            pairs.append(LayerPair(name=name, base=ref, tuned=t_ref))
        elif a_mod is not None:
            pairs.append(LayerPair(name=name, base=ref, lora=lora_info_for(ad, a_mod, ref.shape)))
        else:  # untouched by the adapter: tuned == base
            pairs.append(LayerPair(name=name, base=ref, tuned=ref))
    used_mods = {m for m in mod_map.values()}
    used_rep = set(rep_map.values())
    unpaired_tuned = [m for m in modules if m not in used_mods]
    unpaired_tuned += [n for n in repl if n not in used_rep]
    return Pairing(tuple(pairs), (), tuple(unpaired_tuned), tuple(skipped))


def _check_shapes(base: Checkpoint, tuned: Checkpoint, b: TensorRef, t: TensorRef) -> None:
    if tuple(b.shape) != tuple(t.shape):
        raise PairingError(f"shape mismatch: base {b.name!r} {list(b.shape)} in {b.path} vs tuned "
                           f"{t.name!r} {list(t.shape)} in {t.path}; a fine-tune of another base?")


def _example(names) -> str:
    for n in names:
        return repr(n)
    return "(none)"
