"""Streaming checkpoint writer: one .safetensors file or a sharded directory with its index.

The layout (file names, tensor names, dtypes, shapes, order) is planned before any data is
written, so every safetensors header can be written first and tensors then streamed into place
one at a time: memory holds one tensor, never a model. Outputs are atomic: a file is written to a
temporary sibling and renamed; a directory is built in a temporary sibling and renamed into place
(intruder.io.atomic). Nothing is ever written over an input (check with atomic.check_output).

    plan = plan_like(open_checkpoint("tuned/"))
    with CheckpointWriter("out/", plan, metadata={"intruder.alpha": "0.5"}) as w:
        for spec in plan.tensors():
            w.write(spec.name, tensor_or_bytes)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import IO

from ..errors import CheckpointError, OutputError
from .atomic import atomic_dir, atomic_file
from .checkpoint import PICKLE_SUFFIXES, SAFE_INDEX, Checkpoint
from .jsonfile import read_json
from .safetensors_file import DTYPES, SafetensorsFile

# Files never copied beside rewritten weights: other weight formats would hold stale (unscaled)
# weights that some loaders prefer, and weight indexes are rewritten, not copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx", ".npz", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output: name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][0]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardPlan:
    """One output .safetensors file: its path relative to the output (None: the output itself)."""

    filename: str | None
    tensors: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class OutputPlan:
    """The whole output: a single file (`kind == "file"`) or a directory of shards."""

    kind: str  # file | dir
    shards: tuple[ShardPlan, ...]
    index: bool = False  # write model.safetensors.index.json (dir only)
    index_metadata: tuple[tuple[str, object], ...] = ()  # kept from the input's index
    companions: tuple[tuple[str, str], ...] = ()  # (source file, name in the output dir)

    def tensors(self) -> Iterator[TensorSpec]:
        """Every tensor in the order the writer expects it."""
        for shard in self.shards:
            yield from shard.tensors


def _ordered_specs(ck: Checkpoint, f: str) -> list[TensorSpec]:
    """Specs of the tensors stored in file f, in on-disk order (sequential reads)."""
    names = [n for n, r in ck.refs.items() if r.path == f]
    if f.endswith(".safetensors"):
        entries = SafetensorsFile(f).entries
        names.sort(key=lambda n: (entries[n].start, n))
    return [TensorSpec(n, ck.refs[n].dtype, tuple(ck.refs[n].shape)) for n in names]


def _out_name(rel: str) -> str:
    """Output file name of an input weight file: .bin/.pt shards become .safetensors."""
    if rel.endswith(".safetensors"):
        return rel
    stem = rel
    for suf in PICKLE_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    head, base = os.path.split(stem)
    if base.startswith("pytorch_model"):
        base = "model" + base[len("pytorch_model"):]
    return os.path.join(head, base + ".safetensors")


def plan_like(ck: Checkpoint, overrides: Mapping[str, TensorSpec] | None = None) -> OutputPlan:
    """An output layout mirroring checkpoint `ck` (not an adapter).

    A single file gives a single file; a directory gives the same shard files (pickle shards
    renamed to .safetensors), the index when the input had one or had pickle shards, and every
    companion file (config, tokenizer, ...) copied. `overrides` replaces a tensor's spec (dtype,
    shape) by name.
    """
    if ck.kind == "adapter":
        raise OutputError(f"{ck.path}: an adapter is written as a merged model (plan_merged)")
    over = dict(overrides or {})
    if not os.path.isdir(ck.path):
        specs = [over.get(s.name, s) for s in _ordered_specs(ck, ck.files[0])]
        return OutputPlan("file", (ShardPlan(None, tuple(specs)),))
    shards = []
    for f in ck.files:
        rel = os.path.relpath(f, ck.path)
        specs = [over.get(s.name, s) for s in _ordered_specs(ck, f)]
        shards.append(ShardPlan(_out_name(rel), tuple(specs)))
    pickled = any(not f.endswith(".safetensors") for f in ck.files)
    index = ck.kind == "sharded" or (pickled and len(shards) > 1)
    meta = _index_metadata(ck) if index else ()
    return OutputPlan("dir", tuple(shards), index=index, index_metadata=meta,
                      companions=tuple(companion_files(ck.path)))


def plan_merged(base: Checkpoint, overrides: Mapping[str, TensorSpec] | None = None,
                extra: Sequence[TensorSpec] = (), overlay_dir: str | None = None) -> OutputPlan:
    """A merged-model directory laid out like BASE (adapter input): same shards and names,
    `overrides` replacing specs by name, `extra` tensors (not in BASE) appended to the last
    shard, BASE's companion files, and tokenizer files of `overlay_dir` (the adapter's own
    tokenizer, when it saved one) taking precedence over BASE's."""
    over = dict(overrides or {})
    if os.path.isdir(base.path):
        plan = plan_like(base, over)
        companions = dict((name, src) for src, name in plan.companions)
    else:  # base is one file: the merged model is a directory holding model.safetensors
        specs = [over.get(s.name, s) for s in _ordered_specs(base, base.files[0])]
        plan = OutputPlan("dir", (ShardPlan("model.safetensors", tuple(specs)),))
        companions = {}
    if extra:
        shards = list(plan.shards)
        shards[-1] = replace(shards[-1], tensors=shards[-1].tensors + tuple(extra))
        plan = replace(plan, shards=tuple(shards))
    if overlay_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(overlay_dir, name)
            if os.path.isfile(src):
                companions[name] = src
    return replace(plan, companions=tuple((src, name) for name, src in sorted(companions.items())))


def _index_metadata(ck: Checkpoint) -> tuple[tuple[str, object], ...]:
    for name in (SAFE_INDEX, "pytorch_model.bin.index.json"):
        p = os.path.join(ck.path, name)
        if os.path.isfile(p):
            try:
                doc = read_json(p, CheckpointError, "checkpoint index")
            except CheckpointError:
                return ()
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            if isinstance(meta, dict):
                return tuple((k, v) for k, v in meta.items() if k != "total_size")
    return ()


def companion_files(d: str) -> list[tuple[str, str]]:
    """(source, name) of the regular top-level files of model dir `d` that are not weights or
    weight indexes: config, generation config, tokenizer, README, ... Symlinks (the Hugging Face
    cache) are followed; subdirectories and hidden files are not copied."""
    out = []
    for name in sorted(os.listdir(d)):
        src = os.path.join(d, name)
        low = name.lower()
        if name.startswith(".") or not os.path.isfile(src):
            continue
        if low.endswith(WEIGHT_SUFFIXES) or low.endswith(".index.json"):
            continue
        out.append((src, name))
    return out


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsStreamWriter:
    """Writes one .safetensors file to an open binary handle: header first, then each tensor's
    bytes in the planned order (contiguous, no gaps, as the format requires)."""

    def __init__(self, fh, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None,
                 where: str = ""):
        self.fh = fh
        self.where = where
        self.specs = list(specs)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise OutputError(f"{where}: safetensors metadata must map strings to strings "
                                  f"(bad key {bad[0]!r})")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for s in self.specs:
            if s.name == "__metadata__" or s.name in header:
                raise OutputError(f"{where}: tensor name {s.name!r} is reserved or duplicated")
            if s.dtype not in DTYPES:
                raise OutputError(f"{where}: tensor {s.name!r}: unsupported dtype {s.dtype!r}")
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * ((-len(raw)) % 8)  # 8-byte alignment of the data section
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        self.data_bytes = offset

    def write(self, name: str, data) -> None:
        """Append tensor `name` (a torch tensor or its raw bytes); order and size are checked."""
        if self._next >= len(self.specs):
            raise OutputError(f"{self.where}: unexpected tensor {name!r} (all planned tensors written)")
        spec = self.specs[self._next]
        if name != spec.name:
            raise OutputError(f"{self.where}: expected tensor {spec.name!r} next, got {name!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            dt = str(data.dtype).replace("torch.", "")
            if DTYPES[spec.dtype][1] != dt or tuple(data.shape) != tuple(spec.shape):
                raise OutputError(f"{self.where}: tensor {name!r} is {dt} {list(data.shape)}, "
                                  f"planned {spec.dtype} {list(spec.shape)}")
            data = tensor_bytes(data)
        if len(data) != spec.nbytes:
            raise OutputError(f"{self.where}: tensor {name!r} has {len(data)} bytes, planned "
                              f"{spec.nbytes}")
        self.fh.write(data)
        self._next += 1

    def write_blocks(self, name: str, blocks) -> None:
        """Append tensor `name` from an iterable of byte blocks (in order); the total size is
        checked against the plan."""
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            want = self.specs[self._next].name if self._next < len(self.specs) else None
            raise OutputError(f"{self.where}: expected tensor {want!r} next, got {name!r}")
        spec = self.specs[self._next]
        total = 0
        for blk in blocks:
            self.fh.write(blk)
            total += len(blk)
        if total != spec.nbytes:
            raise OutputError(f"{self.where}: tensor {name!r} has {total} bytes, planned "
                              f"{spec.nbytes}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            missing = self.specs[self._next].name
            raise OutputError(f"{self.where}: tensor {missing!r} was never written")


class CheckpointWriter:
    """Context manager writing an OutputPlan to `path` atomically, one tensor at a time.

    Tensors must arrive in `plan.tensors()` order. Every shard carries the same `metadata`
    (provenance) in its safetensors header; a sharded output also gets a correct
    model.safetensors.index.json (weight_map and total_size). On an exception nothing is left
    behind and an existing `path` is untouched.
    """

    def __init__(self, path: str, plan: OutputPlan, metadata: Mapping[str, str] | None = None,
                 index_extra: Mapping[str, object] | None = None):
        self.path = path
        self.plan = plan
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("format", "pt")  # transformers refuses other formats
        self.index_extra = dict(index_extra or {})
        self._stack: contextlib.ExitStack | None = None
        self._root: str | None = None
        self._shard = -1
        self._cur: SafetensorsStreamWriter | None = None
        self._fh: IO[bytes] | None = None
        self.bytes_written = 0

    def __enter__(self) -> CheckpointWriter:
        self._stack = contextlib.ExitStack()
        try:
            if self.plan.kind == "file":
                self._fh = self._stack.enter_context(atomic_file(self.path, "wb"))
            else:
                self._root = self._stack.enter_context(atomic_dir(self.path))
            self._open_next()
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _open_next(self) -> None:
        """Finish the current shard and start the next one that has a header to write."""
        self._finish_shard()
        self._shard += 1
        if self._shard >= len(self.plan.shards):
            return
        shard = self.plan.shards[self._shard]
        if self.plan.kind == "dir":
            full = self._in_root(shard.filename)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            self._fh = open(full, "wb")
            where = os.path.join(self.path, _rel(shard.filename))
        else:
            where = self.path
        self._cur = SafetensorsStreamWriter(self._fh, shard.tensors, self.metadata, where)
        if not shard.tensors:  # an empty shard is complete as soon as its header is written
            self._open_next()

    def _in_root(self, rel: str | None) -> str:
        """Where a file of a directory output is written (the temporary directory, until the
        rename puts it in place)."""
        assert self._root is not None, "a directory output is open"
        return os.path.join(self._root, _rel(rel))

    def _finish_shard(self) -> None:
        if self._cur is None:
            return
        self._cur.close()
        self.bytes_written += self._cur.data_bytes
        self._cur = None
        if self.plan.kind == "dir" and self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def write(self, name: str, data) -> None:
        """Write the next planned tensor (torch tensor in the planned dtype, or raw bytes)."""
        if self._cur is None:
            raise OutputError(f"{self.path}: unexpected tensor {name!r}: every planned tensor "
                              f"is already written")
        try:
            self._cur.write(name, data)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror})") from exc
        if self._cur._next == len(self._cur.specs):
            self._open_next()

    def _close_fh(self) -> None:
        if self._fh is not None and self.plan.kind == "dir":
            self._fh.close()
            self._fh = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._close_fh()
            return self._stack.__exit__(exc_type, exc, tb)  # rolls back, re-raises
        try:
            self._finish_shard()  # raises when a planned tensor was never written
            if self.plan.kind == "dir":
                self._finish_dir()
        except BaseException as err:
            self._close_fh()
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        try:
            return self._stack.__exit__(None, None, None)  # fsync + rename into place
        except OSError as err:
            raise OutputError(f"{self.path}: cannot write ({err.strerror})") from err

    def _finish_dir(self) -> None:
        if self.plan.index:
            weight_map = {s.name: _rel(shard.filename).replace(os.sep, "/")
                          for shard in self.plan.shards for s in shard.tensors}
            meta = dict(self.plan.index_metadata)
            meta.update(self.index_extra)
            meta["total_size"] = sum(s.nbytes for s in self.plan.tensors())
            with open(self._in_root(SAFE_INDEX), "w", encoding="utf-8") as fh:
                json.dump({"metadata": meta, "weight_map": weight_map}, fh, indent=2)
                fh.write("\n")
        for src, name in self.plan.companions:
            dst = self._in_root(name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                shutil.copyfile(src, dst)
            except OSError as exc:
                raise OutputError(f"{src}: cannot copy into {self.path} ({exc.strerror})") from exc


def write_tensors(path: str, plan: OutputPlan, produce, metadata: Mapping[str, str] | None = None,
                  index_extra: Mapping[str, object] | None = None) -> int:
    """Write every planned tensor, `produce(spec)` returning a tensor or raw bytes; returns the
    number of tensor bytes written."""
    with CheckpointWriter(path, plan, metadata, index_extra) as w:
        for spec in plan.tensors():
            w.write(spec.name, produce(spec))
    return w.bytes_written


def specs_by_name(plan: OutputPlan) -> dict[str, TensorSpec]:
    return {s.name: s for s in plan.tensors()}



def identity_metadata(report) -> dict[str, str]:
    """Safetensors metadata naming the exact inputs an output was made from: per side the
    content sha256, each file's sha256 (JSON) and, for hub inputs, repository and commit."""
    out: dict[str, str] = {}
    for role, info in (("base", report.base), ("tuned", report.tuned)):
        if getattr(info, "sha256", None):
            out[f"intruder.{role}_sha256"] = info.sha256
            out[f"intruder.{role}_files"] = json.dumps(
                {f["name"]: f["sha256"] for f in info.files}, separators=(",", ":"),
                sort_keys=True)
        for key in ("repo_id", "revision", "commit"):
            value = getattr(info, key, None)
            if value:
                out[f"intruder.{role}_{key}"] = str(value)
    return out


def _rel(filename: str | None) -> str:
    """A shard's path inside a directory output (every shard of a directory plan has one)."""
    assert filename is not None, "a directory plan names its shards"
    return filename
