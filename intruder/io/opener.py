"""Open any checkpoint by its path or hub ID: dispatch on the format to the indexers.

checkpoint.py (safetensors, sharded and pickle checkpoints, and the Checkpoint every format
becomes), gguf.py, adapter.py (PEFT) and memory.py (in-memory models) each index one kind;
`open_checkpoint` picks the one a path needs. It sits above them all, so none imports it.
"""

from __future__ import annotations

import os

from ..errors import AdapterError, CheckpointError
from . import hub
from .adapter import open_adapter
from .checkpoint import (
    ADAPTER_WEIGHTS,
    MEMORY,
    PICKLE_SUFFIXES,
    PT_INDEX,
    SAFE_INDEX,
    Checkpoint,
    from_index,
    from_pickle,
    from_safetensors,
    inside_dir,
)
from .gguf import GGUFIndex, open_gguf, open_gguf_dir
from .safetensors_file import check_regular_file


def open_checkpoint(path: str, allow_adapter: bool = True,
                    offline: bool | None = None) -> Checkpoint:
    """Index a checkpoint at `path` (or a hub ID `org/name[@revision]`, intruder.io.hub) without
    reading tensor data. offline: None follows HF_HUB_OFFLINE / --offline."""
    p = os.fspath(path)
    mem = MEMORY.get(p)
    if mem is not None:
        if mem.kind == "adapter" and not allow_adapter:
            raise CheckpointError(f"{p}: is a PEFT model; it can only be the TUNED side "
                                  f"(give the base model as BASE)")
        return mem
    if not os.path.lexists(p) and hub.parse(p) is not None:  # a local path always wins
        src = hub.resolve(p, offline=offline)
        ck = open_checkpoint(src.path, allow_adapter)
        ck.source = src
        return ck
    if not os.path.lexists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    if os.path.isdir(p):
        return _open_dir(p, allow_adapter)
    check_regular_file(p)
    if p.endswith(".safetensors"):
        return from_safetensors(p, [p], "safetensors")
    if p.endswith(".gguf"):
        return _from_gguf(open_gguf(p))
    if p.endswith(PICKLE_SUFFIXES):
        return from_pickle(p, [p])
    if p.endswith(".json"):
        raise CheckpointError(f"{p}: give the directory holding this JSON file, not the file")
    raise CheckpointError(f"{p}: unknown checkpoint format (expected .safetensors, .gguf, .bin, "
                          f".pt, or a model / adapter directory)")


def _open_dir(d: str, allow_adapter: bool) -> Checkpoint:
    # lexists: a dangling or escaping symlink must be reported, not silently skipped
    if os.path.lexists(os.path.join(d, "adapter_config.json")):
        if not allow_adapter:
            raise CheckpointError(f"{d}: is a PEFT adapter; it can only be the TUNED side "
                                  f"(give the base model as BASE)")
        return open_adapter(d)
    index = os.path.join(d, SAFE_INDEX)
    if os.path.lexists(index):
        return from_index(d, inside_dir(d, SAFE_INDEX, d), safetensors=True)
    if os.path.lexists(os.path.join(d, "model.safetensors")):
        return from_safetensors(d, [inside_dir(d, "model.safetensors", d)], "directory")
    pt_index = os.path.join(d, PT_INDEX)
    if os.path.lexists(pt_index):
        return from_index(d, inside_dir(d, PT_INDEX, d), safetensors=False)
    try:
        listing = sorted(os.listdir(d))
    except OSError as exc:
        raise CheckpointError(f"{d}: cannot list the directory ({exc.strerror})") from exc
    orphans = [f for f in ADAPTER_WEIGHTS if f in listing]
    if orphans:
        raise AdapterError(f"{d}: holds {orphans[0]} but no adapter_config.json; without it the "
                           f"rank, lora_alpha and target modules are unknown and the adapter "
                           f"cannot be merged (copy the adapter_config.json saved with it)")
    st_files = [f for f in listing if f.endswith(".safetensors")]
    if st_files:
        return from_safetensors(d, [inside_dir(d, f, d) for f in st_files], "directory")
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if os.path.lexists(os.path.join(d, name)):
            return from_pickle(d, [inside_dir(d, name, d)])
    ggufs = [f for f in listing if f.endswith(".gguf")]
    if ggufs:
        return _from_gguf(open_gguf_dir(d, [inside_dir(d, f, d) for f in ggufs]))
    raise CheckpointError(f"{d}: directory holds no weights (no model.safetensors, "
                          f"{SAFE_INDEX}, pytorch_model.bin or adapter_config.json)")


def _from_gguf(ix: GGUFIndex) -> Checkpoint:
    return Checkpoint(ix.path, "gguf", ix.refs, ix.files, metadata=ix.metadata, aliases=ix.aliases)
