"""Property-based fuzzing of the parsers that read strangers' files.

Safetensors headers (structured mutations of valid files, and raw bytes), sharded-checkpoint
indexes, and PEFT adapter configs. The property: the parser either refuses with an IntruderError
subclass, or accepts and then every promise holds (tensors inside the file, sizes consistent, no
overlap, reads give exactly the stored bytes, shards inside the model directory, LoRA scaling
finite). Any other exception escaping is a failure.

Example counts scale with INTRUDER_FUZZ_SCALE (default 1: about 4,000 examples, ~15 s on one core).
"""

from __future__ import annotations

import json
import math
import os
import struct

import hostile_corpus as hc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from intruder.errors import IntruderError
from intruder.io import open_checkpoint, pair_checkpoints, read_ref
from intruder.io.safetensors_file import DTYPES, SafetensorsFile, torch_dtype

SCALE = float(os.environ.get("INTRUDER_FUZZ_SCALE", "1"))


def fuzz(n: int):
    return settings(max_examples=max(10, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Scratch space, in memory where possible: thousands of small rewrites of one file are
    slow on ext4 (a truncating rewrite flushes the old blocks)."""
    import pathlib
    import shutil
    import tempfile

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(prefix="intruder-fuzz-", dir="/dev/shm")
        yield pathlib.Path(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------ safetensors headers

JUNK = (st.none() | st.booleans() | st.integers(-3, 3) | st.integers(2 ** 62, 2 ** 64)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
        | st.lists(st.integers(-2, 70), max_size=4) | st.dictionaries(st.text(max_size=3),
                                                                      st.integers(), max_size=2))
DTYPE_NAMES = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F8_E4M3", "Q4_K", "f32", ""])


@st.composite
def safetensors_blob(draw):
    """Bytes of a safetensors file: a valid layout, then a few random mutations."""
    n = draw(st.integers(0, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))  # tensor bytes: content is
    header, data, pos = {}, b"", 0  # irrelevant to parsing, so not worth hypothesis' draws
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0]
        header[draw(st.sampled_from([f"t{i}", f"layer.{i}.weight", "", "é\u0000", "__x"]))
               if draw(st.booleans()) else f"t{i}"] = {
            "dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        data += rng.bytes(nbytes)
        pos += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                      max_size=2)
                                      if draw(st.integers(0, 5)) else JUNK)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["field", "offset", "alias", "drop", "entry", "dtype", "shape"]))
        if not names:
            break
        name = draw(st.sampled_from(names))
        e = header[name]
        if not isinstance(e, dict):
            continue
        if op == "field":
            e[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JUNK)
        elif op == "offset" and isinstance(e.get("data_offsets"), list):
            e["data_offsets"] = [o + draw(st.integers(-9, 9)) if isinstance(o, int) else o
                                 for o in e["data_offsets"]]
        elif op == "alias":
            other = header[draw(st.sampled_from(names))]
            if isinstance(other, dict):
                e["data_offsets"] = other.get("data_offsets")
                e["shape"], e["dtype"] = other.get("shape"), other.get("dtype")
        elif op == "drop":
            e.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "entry":
            header[name] = draw(JUNK)
        elif op == "dtype":
            e["dtype"] = draw(DTYPE_NAMES)
        elif op == "shape" and isinstance(e.get("shape"), list):
            e["shape"] = e["shape"] + [draw(st.integers(-1, 3))]
    text = json.dumps(header, allow_nan=True)
    if draw(st.integers(0, 9)) == 7 and names:  # repeat one entry under the same name
        text = text[:-1] + ", " + json.dumps(names[0]) + ": " + json.dumps(header[names[0]]) + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 7:  # corrupt one byte of the header
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    length = len(raw)
    if draw(st.integers(0, 9)) == 7:
        length = draw(st.integers(0, 2 ** 64 - 1) | st.integers(max(0, length - 3), length + 3))
    tail = draw(st.sampled_from(["exact"] * 6 + ["cut", "extra"]))
    if tail == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif tail == "extra":
        data += draw(st.binary(min_size=1, max_size=8))
    return struct.pack("<Q", length) + raw + data


def _check_accepted(path: str) -> None:
    """Open `path`; if accepted, every promise of SafetensorsFile must hold."""
    try:
        f = SafetensorsFile(path)
    except IntruderError as exc:
        event(f"refused: {str(exc).split(': ', 1)[-1][:28]}")
        return
    event(f"accepted with {min(len(f.entries), 2)}+ tensors")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        blob = fh.read()
    (n,) = struct.unpack("<Q", blob[:8])
    assert f.data_start == 8 + n <= size
    spans = []
    for name, e in f.entries.items():
        assert f.data_start <= e.start <= e.end <= size
        numel = int(np.prod(e.shape, dtype=object))
        assert e.end - e.start == numel * DTYPES[e.dtype][0]
        stored = blob[e.start:e.end]
        assert f.raw_bytes(name) == stored
        if torch_dtype(e.dtype) is not None:  # a dtype this torch lacks: parsed, not read as such
            t = f.read(name)
            assert tuple(t.shape) == e.shape
            assert t.reshape(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() == stored
        if e.end > e.start:
            spans.append((e.start, e.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@fuzz(2000)
@given(blob=safetensors_blob())
def test_header_mutations_refused_or_consistent(work, blob):
    path = str(work / "m.safetensors")
    with open(path, "wb") as fh:
        fh.write(blob)
    _check_accepted(path)


@fuzz(800)
@given(head=st.binary(max_size=64) | st.text(max_size=64).map(lambda s: s.encode("utf-8", "replace")),
       tail=st.binary(max_size=32), prefix=st.sampled_from(["exact", "random", "none"]))
def test_raw_bytes_refused_or_consistent(work, head, tail, prefix):
    path = str(work / "r.safetensors")
    if prefix == "exact":
        blob = struct.pack("<Q", len(head)) + head + tail
    elif prefix == "random":
        blob = struct.pack("<Q", int.from_bytes((head + bytes(8))[:8], "little")) + head + tail
    else:
        blob = head + tail
    with open(path, "wb") as fh:
        fh.write(blob)
    _check_accepted(path)


# ------------------------------------------------------------------------ sharded index

SHARD_NAMES = ["model-1.safetensors", "model-2.safetensors", "./model-2.safetensors",
               "sub/../model-1.safetensors", "../outside.safetensors", "../../etc/passwd",
               "/etc/passwd", "link-out.safetensors", "link-in.safetensors", "sub", "fifo",
               "missing.safetensors", "", ".", "..", "nul\x00.safetensors", "a" * 300]


@pytest.fixture(scope="module")
def index_dir(work):
    """A sharded directory with its hazards: a symlink out, a symlink in, a FIFO, a subdir."""
    root = work / "idx"
    d = root / "model"
    t = hc.model_tensors(0)
    names = list(t)
    hc.write_st(str(d / "model-1.safetensors"), {n: t[n] for n in names[:5]})
    hc.write_st(str(d / "model-2.safetensors"), {n: t[n] for n in names[5:]})
    hc.write_st(str(root / "outside.safetensors"), t)
    os.symlink(str(root / "outside.safetensors"), str(d / "link-out.safetensors"))
    os.symlink("model-1.safetensors", str(d / "link-in.safetensors"))
    os.mkfifo(str(d / "fifo"))
    os.makedirs(str(d / "sub"))
    return str(d), names


@fuzz(500)
@given(data=st.data())
def test_index_refused_or_inside_the_directory(index_dir, data):
    d, names = index_dir
    keys = st.sampled_from(names) | st.text(max_size=8)
    values = st.sampled_from(SHARD_NAMES) | st.text(max_size=12) | JUNK
    if data.draw(st.integers(0, 9)) == 7:
        doc = data.draw(JUNK | st.dictionaries(st.text(max_size=10), JUNK, max_size=3))
    else:
        wm = {n: ("model-1.safetensors" if i < 5 else "model-2.safetensors")
              for i, n in enumerate(names)}
        for k, v in data.draw(st.dictionaries(keys, values, max_size=4)).items():
            wm[k] = v
        if data.draw(st.booleans()):
            for n in data.draw(st.lists(st.sampled_from(names), max_size=3)):
                wm.pop(n, None)
        doc = {"metadata": data.draw(JUNK), "weight_map": wm}
    text = json.dumps(doc, allow_nan=True)
    if data.draw(st.integers(0, 9)) == 7:
        text = text[: data.draw(st.integers(0, len(text)))]
    with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8",
              errors="surrogatepass") as fh:
        fh.write(text)
    try:
        ck = open_checkpoint(d)
    except IntruderError as exc:
        event(f"refused: {str(exc).split(': ', 1)[-1][:28]}")
        return
    event("accepted")
    root = os.path.realpath(d)
    assert ck.files
    for f in ck.files:
        assert os.path.commonpath([root, os.path.realpath(f)]) == root
    for name, _rel in doc["weight_map"].items():
        assert name in ck.refs
    t = read_ref(ck.refs[names[0]])
    assert tuple(t.shape) == ck.refs[names[0]].shape


# ------------------------------------------------------------------------ adapter configs

NUMBERS = (st.integers(-2, 20) | st.sampled_from([4, 4.0, 4.5, 8, 16.0, 0, 1e-300, 1e308])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3) | st.none()
           | st.booleans())
PATTERN_KEYS = st.sampled_from(["q_proj", "v_proj", ".*", "layers\\.0\\..*", "q_proj|v_proj",
                                "(", "[", "*", "+", "\\", "a{99999999999}", "(?P<x>", "(a+)+",
                                "model.layers.0.self_attn.q_proj", ""]) | st.text(max_size=6)


@st.composite
def adapter_config(draw):
    cfg = hc.lora_config()
    fields = {
        "peft_type": st.sampled_from(["LORA", "lora", "IA3", "ADALORA", "", None, 3]),
        "r": NUMBERS, "lora_alpha": NUMBERS,
        "rank_pattern": st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=3) | JUNK,
        "alpha_pattern": st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=3) | JUNK,
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "PiSSA_niter_4",
                                              "olora", "corda", "eva", "loftq", 1, None]),
        "use_rslora": JUNK, "use_dora": st.booleans(), "fan_in_fan_out": JUNK,
        "loftq_config": st.sampled_from([{}, None, {"loftq_bits": 4}]),
        "target_modules": JUNK, "modules_to_save": JUNK,
    }
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = draw(fields[key])
    return cfg


@pytest.fixture(scope="module")
def adapter_env(work):
    base = work / "ad-base"
    hc.write_st(str(base / "model.safetensors"), hc.model_tensors(0))
    d = work / "ad"
    hc.write_adapter(str(d), config=False, seed=3)
    return open_checkpoint(str(base)), str(d)


@fuzz(600)
@given(cfg=adapter_config())
def test_adapter_config_refused_or_merged_faithfully(adapter_env, cfg):
    from intruder.run.load import load_pair

    base, d = adapter_env
    with open(os.path.join(d, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh, allow_nan=True)
    try:
        ck = open_checkpoint(d)
        pairing = pair_checkpoints(base, ck)
        handles: dict = {}
        loaded = [load_pair(p, lambda ref: read_ref(ref, handles), False)
                  for p in pairing.pairs if p.lora is not None]
    except IntruderError as exc:
        event(f"refused: {str(exc).split(': ', 1)[-1][:28]}")
        return
    event("accepted")
    assert loaded  # q_proj and v_proj carry LoRA factors
    for item in loaded:
        lora = item.pair.lora
        assert math.isfinite(lora.scaling) and lora.scaling > 0
        assert lora.rank == lora.a.shape[0] == lora.b.shape[1]
        if item.status == "scanned":
            assert item.wt.shape == item.w0.shape
