"""A seeded corpus of broken and hostile inputs, each one a CLI invocation that must fail cleanly.

    python tests/hostile_corpus.py OUTDIR [--seed N]   # writes the corpus and OUTDIR/manifest.json

Every case must give exit status 1, exactly one line on stderr starting with 'Error:' that names
the offending file or tensor (`names`) and matches `expect`, leave every input byte-identical and
write nothing (no report, no temporary file). `error` is the IntruderError subclass the library
raises for it. Cases that `needs` a command not registered yet (scale, report) are skipped by the
tests until it lands. "{OUT}" in argv stands for a fresh, empty output directory.

Two controls (valid inputs, exit 0) prove that the same harness can succeed.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from hostile_reports import REPORT_EDITS, hand_edited_report  # noqa: F401 (part of this corpus)

HIDDEN, INTER, KV, VOCAB = 32, 48, 16, 64
LORA_R = 4


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # arguments after `intruder`
    expect: str  # regular expression searched for in the error line
    names: tuple[str, ...]  # substrings the error line must contain: the file and/or tensor
    error: str  # the IntruderError subclass raised by the library
    covers: str  # the kind of hostile input it stands for
    needs: str = ""  # a CLI command that must be registered, else the case is skipped
    cwd: str = ""  # working directory (default: the fresh output directory)
    marker: str = ""  # a path that a code-execution payload would create; must never exist
    scan: tuple[str, str] = ("", "")  # (base, tuned) when run_scan(base, tuned) raises `error`


# a name that would clear the screen, set the window title, break the line and reverse the text
CONTROL_NAME = "evil\x1b[2J\x1b]0;pwned\x07\r\n\u202eslx"

# ---------------------------------------------------------------------------------- writers


def model_tensors(seed: int, hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    """A one-layer Llama-like state dict (float32), small enough to build in milliseconds."""
    rng = np.random.default_rng(seed)
    inter, kv = hidden * 3 // 2, hidden // 2
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    out = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, hidden))}
    for mod, shape in shapes.items():
        out[f"model.layers.0.{mod}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
    out["model.layers.0.input_layernorm.weight"] = np.ones(hidden)
    out["model.norm.weight"] = np.ones(hidden)
    return {k: v.astype(np.float32) for k, v in out.items()}


def layout(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a valid safetensors file holding `tensors` (float32)."""
    header, chunks, pos = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return header, b"".join(chunks)


def write_raw(path: str, header, data: bytes = b"", length: int | None = None) -> str:
    """A safetensors-shaped file: 8-byte little-endian length, header bytes, data. `header` may be
    a dict (serialised here), str or bytes (written verbatim); `length` overrides the prefix."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", n) + header + data)
    return path


def write_st(path: str, tensors: dict[str, np.ndarray]) -> str:
    header, data = layout(tensors)
    header["__metadata__"] = {"format": "pt"}
    return write_raw(path, header, data)


def write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        if isinstance(obj, str):
            fh.write(obj)
        else:
            json.dump(obj, fh, indent=1)
    return path


def lora_tensors(seed: int, hidden: int = HIDDEN, r: int = LORA_R,
                 modules: Sequence[str] = ("self_attn.q_proj", "self_attn.v_proj")):
    """PEFT-named LoRA factors A (r, in) and B (out, r) for the given modules of layer 0."""
    rng = np.random.default_rng(seed)
    out_dim = {"self_attn.q_proj": hidden, "self_attn.v_proj": hidden // 2}
    t = {}
    for mod in modules:
        pre = f"base_model.model.model.layers.0.{mod}"
        t[f"{pre}.lora_A.weight"] = (rng.standard_normal((r, hidden)) * 0.1).astype(np.float32)
        t[f"{pre}.lora_B.weight"] = (rng.standard_normal((out_dim[mod], r)) * 0.1).astype(np.float32)
    return t


def lora_config(**over) -> dict:
    cfg = {"peft_type": "LORA", "r": LORA_R, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
           "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
           "init_lora_weights": True, "task_type": "CAUSAL_LM"}
    cfg.update(over)
    return cfg


def write_adapter(d: str, tensors=None, config=None, seed: int = 1) -> str:
    os.makedirs(d, exist_ok=True)
    write_st(os.path.join(d, "adapter_model.safetensors"),
             lora_tensors(seed) if tensors is None else tensors)
    if config is not False:
        write_json(os.path.join(d, "adapter_config.json"), config or lora_config())
    return d


class CodeExecution:
    """Pickles as a call to os.mkdir(path): unpickling it runs code (creates the marker dir)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def evil_pickle(path: str, marker: str, fmt: str) -> str:
    """A state dict whose only 'tensor' executes os.mkdir(marker) when unpickled.

    fmt 'legacy': a plain pickle (protocol 2, what torch.save wrote before 1.6); 'zip': torch.save's
    current zip container."""
    sd = {"model.layers.0.self_attn.q_proj.weight": CodeExecution(marker)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if fmt == "legacy":
        with open(path, "wb") as fh:
            pickle.dump(sd, fh, protocol=2)
    else:
        import torch

        torch.save(sd, path)
    return path


def hostile_names_pair(d: str, seed: int = 0) -> tuple[str, str, str]:
    """A base and tuned file whose changed layer (one intruder at rank 0) carries a name built to
    attack a terminal and an HTML page. Returns (base, tuned, the hostile name)."""
    import synthetic

    name = f"model.layers.0.{CONTROL_NAME}<script>alert(1)</script>\"><img src=x>.weight"
    w0, wt, _ = synthetic.plant(96, 96, [0], seed=seed + 3)
    t = model_tensors(seed)
    base = write_st(os.path.join(d, "base.safetensors"), dict(t, **{name: w0.astype(np.float32)}))
    tuned = write_st(os.path.join(d, "tuned.safetensors"), dict(t, **{name: wt.astype(np.float32)}))
    return base, tuned, name


# ---------------------------------------------------------------------------------- corpus


def build_corpus(root: str, seed: int = 0) -> dict[str, object]:
    """Write every input under `root`; return {'cases': [Case], 'controls': [...], 'root': root}."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    J = lambda *p: os.path.join(root, *p)  # noqa: E731
    cases: list[Case] = []

    def add(id, argv, expect, names, error, covers, scan=True, **kw):
        argv = tuple(argv)
        if argv[0] == "scan" and "-o" not in argv:
            argv = argv + ("-q", "-o", "{OUT}/report.json")
        pair = (argv[1], argv[2]) if (scan and argv[0] == "scan") else ("", "")
        cases.append(Case(id, argv, expect, tuple(names), error, covers, scan=pair, **kw))

    # clean inputs
    base_t = model_tensors(seed)
    tuned_t = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in base_t.items()}
    base = write_st(J("clean", "base.safetensors"), base_t)
    tuned = write_st(J("clean", "tuned.safetensors"), tuned_t)
    base_dir = J("clean", "base-dir")
    write_st(os.path.join(base_dir, "model.safetensors"), base_t)
    write_json(os.path.join(base_dir, "config.json"), {"model_type": "llama"})
    adapter = write_adapter(J("clean", "adapter"), seed=seed + 1)
    outside = write_st(J("elsewhere", "secret.safetensors"), base_t)  # target of escapes
    q = "model.layers.0.self_attn.q_proj.weight"
    tb, td = layout(tuned_t)
    tuned_bytes = open(tuned, "rb").read()

    # -- paths and file types
    p = J("missing", "tuned.safetensors")
    add("missing_path", ["scan", base, p], "no such file", [p], "CheckpointError", "missing path")
    d = J("no-weights")
    write_json(os.path.join(d, "config.json"), {"model_type": "llama"})
    write_json(os.path.join(d, "README.md"), "# a model card, no weights\n")
    add("dir_without_weights", ["scan", base, d], "holds no weights", [d], "CheckpointError",
        "directory without weights")
    os.makedirs(J("files"), exist_ok=True)
    p = J("files", "empty.safetensors")
    open(p, "wb").close()
    add("empty_file", ["scan", base, p], "empty", [p], "CheckpointError", "empty file")
    p = J("files", "truncated.safetensors")
    with open(p, "wb") as fh:
        fh.write(tuned_bytes[: int(len(tuned_bytes) * 0.6)])
    add("truncated_file", ["scan", base, p], "outside the data section.*truncated", [p],
        "CheckpointError", "truncated file")
    p = J("files", "random.safetensors")
    with open(p, "wb") as fh:
        fh.write(b"\x00\x00\x10\x00\x00\x00\x00\x00" + rng.bytes(4088))  # length 1 MiB > file
    add("random_bytes", ["scan", base, p], "header length .* larger than the file", [p],
        "CheckpointError", "random bytes")
    p = J("files", "random.bin")
    with open(p, "wb") as fh:
        fh.write(rng.bytes(4096))
    add("random_bytes_pickle", ["scan", base, p], "refused|not a readable PyTorch", [p],
        "CheckpointError", "random bytes (.bin)")
    p = J("files", "model.gguf")
    with open(p, "wb") as fh:
        fh.write(b"GGUF" + rng.bytes(256))
    add("garbage_gguf", ["scan", base, p], "not a readable GGUF file", [p], "CheckpointError",
        "random bytes (.gguf)")
    p = J("files", "model.onnx")
    with open(p, "wb") as fh:
        fh.write(rng.bytes(256))
    add("unknown_format", ["scan", base, p], "unknown checkpoint format", [p], "CheckpointError",
        "random bytes (unknown suffix)")
    add("char_device_null", ["scan", base, "/dev/null"], "not a regular file.*character device",
        ["/dev/null"], "CheckpointError", "character device")
    add("char_device_zero", ["scan", "/dev/zero", tuned], "not a regular file.*character device",
        ["/dev/zero"], "CheckpointError", "character device")
    p = J("fifo", "tuned.safetensors")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    os.mkfifo(p)
    add("fifo_file", ["scan", base, p], "not a regular file.*FIFO", [p], "CheckpointError", "FIFO")
    d = J("fifo-dir")
    os.makedirs(d)
    os.mkfifo(os.path.join(d, "model.safetensors"))
    add("fifo_in_model_dir", ["scan", base, d], "not a regular file.*FIFO",
        [os.path.join(d, "model.safetensors")], "CheckpointError", "FIFO")
    d = J("fifo-adapter")
    write_adapter(d, config=False, seed=seed + 1)
    os.mkfifo(os.path.join(d, "adapter_config.json"))
    add("fifo_adapter_config", ["scan", base_dir, d], "not a regular file.*FIFO",
        [os.path.join(d, "adapter_config.json")], "AdapterError", "FIFO")

    # -- safetensors header
    hd = J("header")
    p = write_raw(os.path.join(hd, "length_past_end.safetensors"), tb, td,
                  length=len(json.dumps(tb)) + len(td) + 100)
    add("header_length_past_end", ["scan", base, p], "larger than the file", [p],
        "CheckpointError", "header length larger than the file")
    p = write_raw(os.path.join(hd, "length_huge.safetensors"), tb, td, length=2 ** 63)
    add("header_length_huge", ["scan", base, p], "exceeds the 100 MB limit", [p],
        "CheckpointError", "header length larger than the file")
    p = write_raw(os.path.join(hd, "not_json.safetensors"), b"{'dtype': F32, oops", td)
    add("header_not_json", ["scan", base, p], "not valid JSON", [p], "CheckpointError",
        "header that is not JSON")
    p = write_raw(os.path.join(hd, "not_utf8.safetensors"), b'{"\xff\xfe": 1}', td)
    add("header_not_utf8", ["scan", base, p], "not valid JSON", [p], "CheckpointError",
        "header that is not JSON")
    p = write_raw(os.path.join(hd, "array.safetensors"), "[1, 2, 3]", td)
    add("header_not_object", ["scan", base, p], "not a JSON object", [p], "CheckpointError",
        "header that is not JSON")
    p = write_raw(os.path.join(hd, "nesting_bomb.safetensors"), "[" * 200_000, b"")
    add("header_nesting_bomb", ["scan", base, p], "not valid JSON", [p], "CheckpointError",
        "header that is not JSON")
    big = dict(tb)
    big[q] = dict(tb[q], data_offsets=[0, "HUGE"])
    text = json.dumps(big).replace('"HUGE"', "9" * 5000)  # Python refuses to convert it
    p = write_raw(os.path.join(hd, "huge_number.safetensors"), text, td)
    add("header_huge_number", ["scan", base, p], "not valid JSON", [p], "CheckpointError",
        "header offsets inconsistent with the byte length")
    bad = dict(tb, __metadata__={"format": "pt", "step": 3})
    p = write_raw(os.path.join(hd, "metadata.safetensors"), bad, td)
    add("header_metadata_not_strings", ["scan", base, p], "__metadata__", [p], "CheckpointError",
        "header that is not JSON")
    bad = dict(tb)
    bad[q] = dict(tb[q], data_offsets=[tb[q]["data_offsets"][0], len(td) + 4096])
    p = write_raw(os.path.join(hd, "offsets_outside.safetensors"), bad, td)
    add("offsets_outside_data", ["scan", base, p], "outside the data section", [p, q],
        "CheckpointError", "header offsets inconsistent with the byte length")
    bad = dict(tb)
    bad[q] = dict(tb[q], shape=[HIDDEN, HIDDEN - 1])
    p = write_raw(os.path.join(hd, "shape_vs_bytes.safetensors"), bad, td)
    add("shape_inconsistent_with_bytes", ["scan", base, p], r"needs \d+ bytes but data_offsets",
        [p, q], "CheckpointError", "header shape inconsistent with the byte length")
    bad = dict(tb)
    s0, e0 = tb[q]["data_offsets"]
    bad[q] = dict(tb[q], data_offsets=[e0, s0])
    p = write_raw(os.path.join(hd, "offsets_reversed.safetensors"), bad, td)
    add("offsets_reversed", ["scan", base, p], "outside the data section", [p, q],
        "CheckpointError", "header offsets inconsistent with the byte length")
    bad = dict(tb)
    bad[q] = dict(tb[q], shape=[-HIDDEN, -HIDDEN])
    p = write_raw(os.path.join(hd, "negative_shape.safetensors"), bad, td)
    add("shape_negative", ["scan", base, p], "invalid shape", [p, q], "CheckpointError",
        "header shape inconsistent with the byte length")
    k = "model.layers.0.self_attn.o_proj.weight"
    bad = dict(tb)
    bad[k] = dict(tb[k], data_offsets=list(tb[q]["data_offsets"]))  # o_proj aliases q_proj
    p = write_raw(os.path.join(hd, "overlap.safetensors"), bad, td)
    add("overlapping_tensors", ["scan", base, p], "overlap", [p, q, k], "CheckpointError",
        "overlapping tensors")
    entry = json.dumps(tb[q])
    text = json.dumps(tb)[:-1] + f', "{q}": {entry}}}'  # the same name twice in one header
    p = write_raw(os.path.join(hd, "duplicate_name.safetensors"), text, td)
    add("duplicate_tensor_name", ["scan", base, p], "twice", [p, q], "CheckpointError",
        "duplicate tensors")
    bad = dict(tb)
    bad[q] = dict(tb[q], dtype="Q4_K")
    p = write_raw(os.path.join(hd, "dtype.safetensors"), bad, td)
    add("unsupported_dtype", ["scan", base, p], "unsupported dtype 'Q4_K'", [p, q],
        "CheckpointError", "unsupported dtype")

    # -- shards, index, symlinks
    names = list(tuned_t)
    d = J("shards", "duplicate")
    write_st(os.path.join(d, "a.safetensors"), {n: tuned_t[n] for n in names[:5]})
    write_st(os.path.join(d, "b.safetensors"), {n: tuned_t[n] for n in names[4:]})
    add("duplicate_across_shards", ["scan", base, d], "also appears in",
        [os.path.join(d, "b.safetensors"), names[4]], "CheckpointError", "duplicate tensors")

    def sharded(name: str, weight_map=None, index_text: str | None = None) -> tuple[str, str]:
        d = J("index", name)
        write_st(os.path.join(d, "model-1.safetensors"), {n: tuned_t[n] for n in names[:5]})
        write_st(os.path.join(d, "model-2.safetensors"), {n: tuned_t[n] for n in names[5:]})
        wm = {n: "model-1.safetensors" for n in names[:5]}
        wm.update({n: "model-2.safetensors" for n in names[5:]})
        wm.update(weight_map or {})
        idx = os.path.join(d, "model.safetensors.index.json")
        write_json(idx, index_text if index_text is not None
                   else {"metadata": {"total_size": 0}, "weight_map": wm})
        return d, idx

    d, idx = sharded("not-json", index_text='{"weight_map": {"a": "model-1.safetensors",}')
    add("index_not_json", ["scan", base, d], "not valid JSON", [idx], "CheckpointError",
        "index.json that is not JSON")
    d, idx = sharded("no-weight-map", index_text='{"metadata": {}}')
    add("index_no_weight_map", ["scan", base, d], "no 'weight_map'", [idx], "CheckpointError",
        "index.json that is not JSON")
    d, idx = sharded("missing-shard", {names[-1]: "model-3.safetensors"})
    add("index_missing_shard", ["scan", base, d], "does not exist", [idx, "model-3.safetensors"],
        "CheckpointError", "index.json naming a missing shard")
    d, idx = sharded("dotdot", {names[-1]: "../../elsewhere/secret.safetensors"})
    add("index_path_escapes", ["scan", base, d], "outside the model directory",
        [idx, "../../elsewhere/secret.safetensors"], "CheckpointError",
        "index.json naming a path outside the model directory")
    d, idx = sharded("absolute", {names[-1]: outside})
    add("index_absolute_path", ["scan", base, d], "must be a relative file name", [idx, outside],
        "CheckpointError", "index.json naming a path outside the model directory")
    d, idx = sharded("symlink", {names[-1]: "model-3.safetensors"})
    os.symlink(outside, os.path.join(d, "model-3.safetensors"))
    add("index_symlink_escapes", ["scan", base, d], "outside the model directory",
        [idx, "model-3.safetensors"], "CheckpointError", "a symlink leaving the model directory")
    d, idx = sharded("lies", {names[0]: "model-2.safetensors"})
    add("index_wrong_shard", ["scan", base, d], "is listed in", [idx, names[0]],
        "CheckpointError", "index.json inconsistent with its shards")
    d, idx = sharded("control-chars", {names[-1]: CONTROL_NAME + ".safetensors"})
    os.mkfifo(os.path.join(d, CONTROL_NAME + ".safetensors"))
    add("shard_name_with_control_chars", ["scan", base, d], r"evil\\x1b\[2J.*\\n.*not a regular file \(a FIFO\)",
        [d, "\\n"], "CheckpointError", "terminal control characters in a stranger's file name")
    d = J("symlink-model")
    os.makedirs(d)
    os.symlink(outside, os.path.join(d, "model.safetensors"))
    add("model_symlink_escapes", ["scan", base, d], "outside the model directory",
        [d, "model.safetensors"], "CheckpointError", "a symlink leaving the model directory")

    # -- pairing and values
    p = write_st(J("pairing", "renamed.safetensors"),
                 {"encoder." + k[len("model."):].replace("layers.0.", "blocks.zero."): v
                  for k, v in tuned_t.items()})
    add("no_common_names", ["scan", base, p], "no tensor names in common", [base, p],
        "PairingError", "no tensor names in common")
    p = write_st(J("pairing", "other_base.safetensors"), model_tensors(seed + 7, hidden=HIDDEN * 2))
    add("shape_mismatch_finetune", ["scan", base, p], "shape mismatch", [p, "model.layers.0."],
        "PairingError", "shape mismatch (fine-tune of another base)")
    d = write_adapter(J("pairing", "adapter-other-base"),
                      tensors=lora_tensors(seed + 2, hidden=HIDDEN * 2), seed=seed)
    add("shape_mismatch_adapter", ["scan", base_dir, d], "another base model",
        [d, "model.layers.0.self_attn."], "AdapterError", "shape mismatch (adapter of another base)")
    t = dict(tuned_t)
    t[q] = t[q].copy()
    t[q][3, 5] = np.nan
    p = write_st(J("values", "nan.safetensors"), t)
    add("nan_in_tuned", ["scan", base, p], "NaN or Inf", [p, q], "NonFiniteError", "NaN in a weight")
    t = dict(base_t)
    k = "model.layers.0.mlp.down_proj.weight"
    t[k] = t[k].copy()
    t[k][0, 0] = np.inf
    p = write_st(J("values", "inf_base.safetensors"), t)
    add("inf_in_base", ["scan", p, tuned], "NaN or Inf", [p, k], "NonFiniteError", "Inf in a weight")

    # -- adapters
    ad = J("adapters")
    d = write_adapter(os.path.join(ad, "no-config"), config=False, seed=seed)
    add("adapter_config_missing", ["scan", base_dir, d], "no adapter_config.json", [d],
        "AdapterError", "adapter_config.json missing")
    d = write_adapter(os.path.join(ad, "config-not-json"), seed=seed)
    write_json(os.path.join(d, "adapter_config.json"), "{'peft_type': 'LORA', r: 8")
    add("adapter_config_not_json", ["scan", base_dir, d], "not valid JSON",
        [os.path.join(d, "adapter_config.json")], "AdapterError", "adapter_config.json not JSON")
    d = write_adapter(os.path.join(ad, "config-list"), config=[lora_config()], seed=seed)
    add("adapter_config_not_object", ["scan", base_dir, d], "not a JSON object",
        [os.path.join(d, "adapter_config.json")], "AdapterError", "adapter_config.json not JSON")
    d = write_adapter(os.path.join(ad, "unknown-type"), config=lora_config(peft_type="MYSTERY"),
                      seed=seed)
    add("adapter_unknown_peft_type", ["scan", base_dir, d], "peft_type 'MYSTERY' is not supported",
        [os.path.join(d, "adapter_config.json")], "AdapterError", "unknown peft_type")
    d = write_adapter(os.path.join(ad, "r-mismatch"), config=lora_config(r=16), seed=seed)
    add("adapter_r_inconsistent", ["scan", base_dir, d], "rank 4 but the config .* says 16",
        [d, "q_proj"], "AdapterError", "r inconsistent with the tensors")
    d = write_adapter(os.path.join(ad, "pissa"), config=lora_config(init_lora_weights="pissa"),
                      seed=seed)
    add("adapter_pissa_unconverted", ["scan", base_dir, d], "pissa.*residual base",
        [os.path.join(d, "adapter_config.json")], "AdapterError", "PiSSA-style init unconverted")
    d = write_adapter(os.path.join(ad, "bad-pattern"),
                      config=lora_config(rank_pattern={"q_proj[": 4}), seed=seed)
    add("adapter_pattern_not_regex", ["scan", base_dir, d], "not a valid regular expression",
        [os.path.join(d, "adapter_config.json"), "q_proj["], "AdapterError",
        "adapter_config.json with a broken rank_pattern")
    d = write_adapter(os.path.join(ad, "alpha-string"), config=lora_config(lora_alpha="16"),
                      seed=seed)
    add("adapter_alpha_not_number", ["scan", base_dir, d], "lora_alpha must be a positive number",
        [os.path.join(d, "adapter_config.json")], "AdapterError",
        "adapter_config.json with a non-numeric lora_alpha")
    t = {k: v for k, v in lora_tensors(seed).items() if "v_proj.lora_B" not in k}
    d = write_adapter(os.path.join(ad, "one-factor"), tensors=t, seed=seed)
    add("adapter_one_factor", ["scan", base_dir, d], "only one of its two LoRA factors",
        [d, "v_proj"], "AdapterError", "adapter with a missing factor")
    add("adapter_as_base", ["scan", adapter, tuned], "only be the TUNED side", [adapter],
        "CheckpointError", "adapter given as the base")

    # -- pickles that would execute code
    mk = J("markers")
    os.makedirs(mk, exist_ok=True)
    for fmt in ("legacy", "zip"):
        marker = os.path.join(mk, f"pwned-{fmt}")
        p = evil_pickle(J("pickle", f"evil-{fmt}.bin"), marker, fmt)
        add(f"pickle_code_execution_{fmt}", ["scan", base, p], "refused: the pickle calls posix.mkdir",
            [p], "CheckpointError", "a pickle that would execute code", marker=marker)
    d = J("pickle", "model-dir")
    marker = os.path.join(mk, "pwned-dir")
    p = evil_pickle(os.path.join(d, "pytorch_model.bin"), marker, "zip")
    add("pickle_code_execution_dir", ["scan", base, d], "refused", [p], "CheckpointError",
        "a pickle that would execute code", marker=marker)

    # -- outputs
    add("output_is_input", ["scan", base, tuned, "-q", "-o", tuned], "would overwrite the input",
        [tuned], "OutputError", "-o pointing at an input file", scan=False)
    p = os.path.join(base_dir, "report.json")
    add("output_inside_input_dir", ["scan", base_dir, adapter, "-q", "-o", p],
        "inside the input directory", [p, base_dir], "OutputError",
        "-o pointing into an input directory", scan=False)
    p = os.path.join(adapter, "sub", "report.json")
    add("output_inside_adapter_dir", ["scan", base_dir, adapter, "-q", "-o", p],
        "inside the input directory|does not exist", [p], "OutputError",
        "-o pointing into an input directory", scan=False)
    add("html_is_input", ["scan", base, tuned, "-q", "-o", "{OUT}/report.json", "--html", base],
        "would overwrite the input", [base], "OutputError", "-o pointing at an input file",
        scan=False)
    add("output_parent_missing", ["scan", base, tuned, "-q", "-o", "{OUT}/no/such/report.json"],
        "does not exist", ["no/such"], "OutputError", "unwritable output", scan=False)

    # -- scan reports edited by hand (scale and report read them)
    rd = J("reports")
    for edit, expect in REPORT_EDITS.items():
        p = hand_edited_report(os.path.join(rd, edit, "intruder-scan.json"), edit)
        add(f"report_{edit}_report_cmd", ["report", p, "-o", "{OUT}/audit.html"], expect, [p],
            "ReportError", "a hand-edited scan JSON violating the schema", needs="report")
        # scale reads ./intruder-scan.json by default
        add(f"report_{edit}_scale_cmd", ["scale", "--alpha", "0.5", "-o", "{OUT}/scaled"], expect,
            ["intruder-scan.json"],
            "ReportError", "a hand-edited scan JSON given to scale", needs="scale",
            cwd=os.path.dirname(p))

    # -- the other commands that open checkpoints
    trunc = J("files", "truncated.safetensors")
    evil = J("pickle", "evil-zip.bin")
    add("layers_truncated_file", ["layers", trunc], "outside the data section", [trunc],
        "CheckpointError", "truncated file")
    add("layers_pickle_code_execution", ["layers", evil], "refused: the pickle calls posix.mkdir",
        [evil], "CheckpointError", "a pickle that would execute code",
        marker=os.path.join(mk, "pwned-zip"))
    add("scale_truncated_file", ["scale", base, trunc, "--alpha", "0.5", "-q", "-o",
                                 "{OUT}/scaled"], "outside the data section", [trunc],
        "CheckpointError", "truncated file", needs="scale")
    add("scale_fifo", ["scale", base, J("fifo", "tuned.safetensors"), "--alpha", "0.5", "-q", "-o",
                       "{OUT}/scaled"], "not a regular file.*FIFO", [J("fifo", "tuned.safetensors")],
        "CheckpointError", "FIFO", needs="scale")

    controls = [("scan", base, tuned, "-q", "-o", "{OUT}/report.json"),
                ("scan", base_dir, adapter, "-q", "-o", "{OUT}/report.json")]
    manifest = {"root": root, "seed": seed, "cases": [asdict(c) for c in cases],
                "controls": controls}
    write_json(os.path.join(root, "manifest.json"), manifest)
    return {"root": root, "cases": cases, "controls": controls}


def immutable(path) -> bool:
    """Make a directory unwritable even for root (chattr +i); False where that is impossible."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return True
    try:
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return r.returncode == 0


def mutable(path) -> None:
    """Undo immutable()."""
    if os.geteuid() != 0:
        os.chmod(path, 0o755)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def snapshot(root: str) -> dict[str, str]:
    """{relative path: sha256 of a regular file, 'link:<target>', 'fifo' or 'dir'} for everything
    under root; FIFOs are never opened."""
    import hashlib
    import stat

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(full)
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = "fifo"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                h = hashlib.sha256()
                with open(full, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                out[rel] = h.hexdigest()
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.path.exists(args.outdir) and os.listdir(args.outdir):
        sys.exit(f"{args.outdir}: not empty")
    res = build_corpus(args.outdir, args.seed)
    for c in res["cases"]:
        print(f"{c.id:34s} {c.covers}")
    print(f"{len(res['cases'])} cases written to {res['root']} (manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
