"""Checkpoint index: a single .safetensors file, a (sharded) Hugging Face directory, a GGUF file, a
PyTorch state dict (weights_only), or a PEFT adapter directory. Tensors are read lazily, one at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..types import CheckpointInfo, TensorRef
from . import hub
from . import identity as ident
from .dequant import attach_storage, decode
from .gguf import GGUFFile
from .jsonfile import read_json
from .safetensors_file import DTYPES, SafetensorsFile, _valid_unicode, check_regular_file, gc_paused

if TYPE_CHECKING:  # annotations only: both import this module
    from .adapter import Adapter
    from .memory import MemoryCheckpoint

SAFE_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# torch dtype name -> safetensors dtype string (for pickle checkpoints)
_TORCH_TO_ST = {v[1]: k for k, v in DTYPES.items()}


@dataclass
class Checkpoint:
    """Names, shapes and dtypes of every tensor, and where each one lives; no data held."""

    path: str
    kind: str  # safetensors | sharded | directory | pickle | adapter | gguf
    refs: dict[str, TensorRef]
    files: list[str]
    adapter: Adapter | None = None  # set for kind == adapter
    metadata: dict[str, str] = field(default_factory=dict)
    # GGUF: our name of a tensor -> the other Hugging Face spellings of it (io/gguf.py); pairing
    # renames to the one the other checkpoint uses
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _open: dict[str, object] = field(default_factory=dict, repr=False)

    def read(self, name: str):
        """Load one tensor (CPU, stored dtype). Only the file holding it is touched."""
        ref = self.refs.get(name)
        if ref is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return read_ref(ref, self._open)

    source: hub.ResolvedSource | None = None  # set for a hub ID

    def identity_files(self) -> list[str]:
        """Files whose bytes make the checkpoint: the weights, and an adapter's config."""
        extra = []
        if self.kind == "adapter":
            extra = [os.path.join(self.path, "adapter_config.json")]
        return list(self.files) + extra

    def info(self, identity: bool = True) -> CheckpointInfo:
        """Identity for reports; identity=False skips the sha256 of the files."""
        total = sum(os.path.getsize(f) for f in self.files)
        adapter = self.adapter.summary() if self.adapter is not None else None
        files: tuple[dict[str, Any], ...] = ()
        content: str | None = None
        if identity:
            files = tuple(ident.file_identities(self.identity_files(), self.path))
            content = ident.content_hash([f["sha256"] for f in files])
        src = self.source
        repo_id: str | None
        revision: str | None
        commit: str | None
        if src is not None:
            repo_id, revision, commit = src.repo_id, src.revision, src.commit
        else:  # a path inside the hub cache still names its repository and commit
            repo_id, commit = hub.identify_snapshot(self.path) or (None, None)
            revision = None
        return CheckpointInfo(path=self.path, kind=self.kind, n_tensors=len(self.refs),
                              bytes=total, dtypes=tuple(sorted({r.dtype for r in self.refs.values()})),
                              fingerprint=(content or self.header_fingerprint())[:16],
                              adapter=adapter, sha256=content, files=files, repo_id=repo_id,
                              revision=revision, commit=commit)

    def header_fingerprint(self) -> str:
        """Reports before schema 1.2: sha256 of tensor names, dtypes, shapes and file sizes."""
        h = tensor_table_sha256(self.refs)
        for f in self.files:
            # file names are bytes to the system; fsencode keeps non-UTF-8 names hashable
            h.update(os.fsencode(os.path.basename(f)) + f"|{os.path.getsize(f)}\n".encode())
        return h.hexdigest()[:16]


def tensor_table_sha256(refs: Mapping[str, TensorRef]) -> hashlib._Hash:
    """A sha256 fed the tensor names, dtypes and shapes, one `name|dtype|shape` line each in
    name order (lone surrogates in names kept); a header fingerprint goes on with file sizes."""
    h = hashlib.sha256()
    for name in sorted(refs):
        r = refs[name]
        h.update(f"{name}|{r.dtype}|{r.shape}\n".encode("utf-8", "surrogatepass"))
    return h


def _handle(path: str, cache: dict[str, object]):
    handle = cache.get(path)
    if handle is None:
        mem = MEMORY.get(path)
        if mem is not None:
            handle = mem.store
        elif path.endswith(".safetensors"):
            handle = SafetensorsFile(path)
        elif path.endswith(".gguf"):
            handle = GGUFFile(path)
        else:
            handle = _PickleFile(path)
        cache.clear()  # keep one file open at a time
        cache[path] = handle
    return handle


# in-memory checkpoints (intruder.io.memory), by their `<memory N: label>` path; held weakly
MEMORY: weakref.WeakValueDictionary[str, MemoryCheckpoint] = weakref.WeakValueDictionary()


def read_ref(ref: TensorRef, cache: dict[str, object] | None = None):
    """Read the tensor a TensorRef points at, decoded to float when it is stored quantized
    (io/dequant.py, io/gguf.py). `cache` keeps parsed headers (not data) per file."""
    cache = {} if cache is None else cache
    if ref.storage is not None and not ref.path.endswith(".gguf"):
        return decode(ref, lambda r: read_stored_bytes(r, cache), lambda r: read_ref(r, cache))
    handle = _handle(ref.path, cache)
    if ref.name not in handle.entries:
        raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is not in the file")
    if ref.path.endswith(".gguf"):
        return handle.read(ref.name, ref.storage)
    return handle.read(ref.name)


def read_stored_bytes(ref: TensorRef, cache: dict[str, object] | None = None):
    """A tensor's stored bytes as a flat uint8 torch tensor (for decoders)."""
    import torch

    cache = {} if cache is None else cache
    handle = _handle(ref.path, cache)
    if ref.name not in handle.entries:
        raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is not in the file")
    if isinstance(handle, SafetensorsFile):
        data = bytearray(handle.raw_bytes(ref.name))
        return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return handle.read(ref.name).contiguous().reshape(-1).view(torch.uint8)


def _allowed_roots(root: str) -> tuple[list[str], str]:
    """The model directory, plus the blob store when it is a Hugging Face cache snapshot
    (<repo>/snapshots/<revision>/ whose files are symlinks into <repo>/blobs/); and why a blob
    store was not trusted ("" if there is none). `root` is already resolved. The blob store is
    trusted only as a real folder inside the repository folder: `blobs -> /` would otherwise let
    a snapshot link reach any file on the machine."""
    roots = [root]
    if os.path.basename(os.path.dirname(root)) != "snapshots":
        return roots, ""
    repo = os.path.dirname(os.path.dirname(root))
    blobs = os.path.join(repo, "blobs")
    if os.path.islink(blobs):
        return roots, f"{blobs} is a symlink, so the snapshot's blob store is not trusted"
    if not os.path.isdir(blobs):
        return roots, ""
    real = os.path.realpath(blobs)
    if os.path.commonpath([repo, real]) != repo:  # cannot happen below a resolved root; kept
        return roots, f"{blobs} resolves outside {repo}, so it is not trusted"
    roots.append(real)
    return roots, ""


def inside_dir(d: str, rel: str, what: str) -> str:
    """Resolve rel inside directory d; refuse paths or symlinks that leave it."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\x00" in rel:
        raise CheckpointError(f"{what}: shard path {rel!r} must be a relative file name")
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file can have that name
        raise CheckpointError(f"{what}: shard path {rel!r} is not a valid file name") from None
    root = os.path.realpath(d)
    full = os.path.realpath(os.path.join(d, rel))
    roots, distrust = _allowed_roots(root)
    if not any(os.path.commonpath([r, full]) == r for r in roots):
        raise CheckpointError(f"{what}: {rel!r} resolves to {full}, outside the model "
                              f"directory {root}; refused" + (f" ({distrust})" if distrust else ""))
    if not os.path.exists(full):
        raise CheckpointError(f"{what}: names {rel!r}, which does not exist")
    # the name, not the resolved target: a Hugging Face cache blob has no .safetensors suffix
    joined = os.path.normpath(os.path.join(d, rel))
    check_regular_file(joined, "file of a checkpoint")
    return joined


def load_json(path: str) -> object:
    """A checkpoint's JSON file (index, config), size-limited; CheckpointError when unreadable."""
    return read_json(path, CheckpointError, "JSON file")


def from_index(d: str, index: str, safetensors: bool) -> Checkpoint:
    """A sharded checkpoint from its index JSON (safetensors or pickle shards inside d)."""
    doc = load_json(index)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: no 'weight_map' object mapping tensor names to shards")
    shards: dict[str, str] = {}
    for name, rel in wm.items():
        if not isinstance(rel, str):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {rel!r}, not a file name")
        if rel not in shards:
            shards[rel] = inside_dir(d, rel, index)
    files = sorted(set(shards.values()))
    ck = (from_safetensors if safetensors else from_pickle_kind)(d, files, "sharded")
    for name, rel in wm.items():
        ref = ck.refs.get(name)
        if ref is None:
            raise CheckpointError(f"{index}: tensor {name!r} is not in shard {rel!r}")
        if ref.path != shards[rel]:
            raise CheckpointError(f"{index}: tensor {name!r} is listed in {rel!r} but found in "
                                  f"{os.path.basename(ref.path)!r}")
    return ck


def from_safetensors(path: str, files: Iterable[str], kind: str) -> Checkpoint:
    """Index safetensors files (headers only) as one checkpoint of the given kind."""
    refs: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    files = list(files)
    handles: dict[str, SafetensorsFile] = {}
    for f in files:
        sf = handles[f] = SafetensorsFile(f)
        metadata.update(sf.metadata)
        with gc_paused():  # a million small acyclic objects (safetensors_file.gc_paused)
            for name, e in sf.entries.items():
                if name in refs:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in "
                                          f"{os.path.basename(refs[name].path)}")
                refs[name] = TensorRef(f, name, e.shape, e.dtype)
    refs = attach_storage(refs, _model_config(path),
                          lambda r: read_stored_bytes(r, {r.path: handles[r.path]}))
    return Checkpoint(path, kind, refs, files, metadata=metadata)


def _model_config(path: str) -> dict | None:
    """config.json of a model directory (for quantization_config), or None; never an error."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        return None
    try:
        doc = load_json(cfg)
    except CheckpointError:
        return None
    return doc if isinstance(doc, dict) else None


def _unpickle_reason(exc: Exception) -> str:
    """The useful line of torch's weights-only refusal (it also suggests weights_only=False,
    which is exactly what must not be done with a stranger's file)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    for line in lines:
        m = re.search(r"GLOBAL ([\w.]+)", line)
        if m:
            return (f"the pickle calls {m.group(1)}, which would run code if unpickled "
                    f"(a state dict holds only tensors)")
    for line in lines:
        m = re.search(r"[Uu]nsupported operand (\S+)", line)
        if m:
            return (f"not a plain tensor pickle (pickle opcode {m.group(1)} is not allowed); "
                    f"corrupt, or it holds more than tensors")
    rest = [l for l in lines if not l.startswith(("Weights only load failed", "Please file",
                                                   "Check the documentation"))]
    return f"the pickle holds more than tensors ({(rest or ['unsafe content'])[0][:160]})"


class _PickleFile:
    """A torch.save'd state dict, loaded with weights_only=True (no code runs) and memory-mapped."""

    def __init__(self, path: str):
        import pickle

        import torch

        self.path = path
        check_regular_file(path)
        try:
            with warnings.catch_warnings():
                # torch's notices (e.g. on the pickle protocol) would break the one-line error
                warnings.simplefilter("ignore")
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
                    if "mmap" not in str(exc):
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path}: refused: {_unpickle_reason(exc)}; nothing in it was "
                                  f"run (weights-only loader); convert it to safetensors inside "
                                  f"a sandbox") from exc
        except Exception as exc:  # torch raises many types for garbage input
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                                  f"({exc.__class__.__name__})") from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
        self.entries = {}
        for k, v in sd.items():
            if isinstance(k, str) and isinstance(v, torch.Tensor):
                if not _valid_unicode(k):
                    raise CheckpointError(f"{path}: tensor name {k!r} is not valid Unicode")
                dt = _TORCH_TO_ST.get(str(v.dtype).replace("torch.", ""))
                if dt is None:
                    raise CheckpointError(f"{path}: tensor {k!r}: unsupported dtype {v.dtype}")
                self.entries[k] = v

    def read(self, name: str):
        return self.entries[name].clone()


def from_pickle(path: str, files: list[str]) -> Checkpoint:
    """A PyTorch state dict (weights_only unpickling) as a checkpoint."""
    return from_pickle_kind(path, files, "pickle")


def from_pickle_kind(path: str, files: Iterable[str], kind: str) -> Checkpoint:
    """Load pickle files (weights_only unpickling) and index their tensors as one checkpoint."""
    refs: dict[str, TensorRef] = {}
    for f in files:
        pf = _PickleFile(f)
        for name, t in pf.entries.items():
            if name in refs:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in "
                                      f"{os.path.basename(refs[name].path)}")
            dt = _TORCH_TO_ST[str(t.dtype).replace("torch.", "")]
            refs[name] = TensorRef(f, name, tuple(t.shape), dt)
    refs = attach_storage(refs, _model_config(path))
    return Checkpoint(path, "pickle" if kind == "pickle" else kind, refs, list(files))
