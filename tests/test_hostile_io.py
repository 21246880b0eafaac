"""Hostile inputs on the reading side, beyond tests/hostile_corpus.py: each case here was accepted,
hung, crashed with a traceback or printed a file's raw bytes before the reader refused it.

Grouped by kind: safetensors layout and sizes; paths (Hugging Face snapshot escapes, non-UTF-8
names, unreadable inputs); adapters whose merge would differ from PEFT's; hangs (regular
expressions from adapter_config.json, quadratic pairing). CLI cases run through the real entry
point, `python -m intruder`, in forked children of one warm interpreter (tests/cli_batch.py) and
must end with exactly one `Error:` line (exit 1) or succeed (exit 0) as stated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import hostile_corpus as hc
import numpy as np
import pytest

from intruder.errors import AdapterError, CheckpointError
from intruder.io import open_checkpoint, pair_checkpoints
from intruder.io.checkpoint import Checkpoint
from intruder.io.safetensors_file import SafetensorsFile
from intruder.types import TensorRef

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
Q = "model.layers.0.self_attn.q_proj.weight"
PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: str  # regular expression searched for in the one error line ("" : must succeed)
    kind: str  # layout | paths | adapter | hang
    absent: tuple[str, ...] = ()  # strings the error line must not contain


def build(root: str) -> dict[str, object]:
    """Write every input under root; return {'cases': [Case], 'base': ..., ...}."""
    J = lambda *p: os.path.join(root, *p)  # noqa: E731
    cases: list[Case] = []

    def add(id, argv, expect, kind, absent=()):
        argv = tuple(argv)
        if argv[0] == "scan":
            argv = argv + ("-q", "-o", "{OUT}/report.json")
        cases.append(Case(id, argv, expect, kind, tuple(absent)))

    base_t = hc.model_tensors(0)
    base = hc.write_st(J("base", "model.safetensors"), base_t)
    base_dir = os.path.dirname(base)
    tb, td = hc.layout(base_t)

    # -- safetensors layout and sizes
    k = "model.layers.0.self_attn.k_proj.weight"
    gap = {}
    shift = 0
    for name, e in tb.items():  # 16 unused bytes before k_proj (offsets of the rest shifted)
        if name == k:
            shift = 16
        s, t = e["data_offsets"]
        gap[name] = dict(e, data_offsets=[s + shift, t + shift])
    s_k = tb[k]["data_offsets"][0]
    p = hc.write_raw(J("layout", "gap.safetensors"), gap, td[:s_k] + b"\0" * 16 + td[s_k:])
    add("gap_between_tensors", ["scan", base, p], r"16 unused bytes after tensor .*q_proj",
        "layout")
    p = hc.write_raw(J("layout", "trailing.safetensors"), tb, td + b"hidden payload")
    add("trailing_bytes", ["scan", base, p], r"14 bytes after the last tensor", "layout")
    lead = {n: dict(e, data_offsets=[e["data_offsets"][0] + 8, e["data_offsets"][1] + 8])
            for n, e in tb.items()}
    p = hc.write_raw(J("layout", "leading.safetensors"), lead, b"\0" * 8 + td)
    add("gap_before_first_tensor", ["scan", base, p], r"8 unused bytes before the first tensor",
        "layout")
    inside = dict(tb)
    s_q = tb[Q]["data_offsets"][0]
    inside["model.layers.0.hidden.weight"] = {"dtype": "F32", "shape": [0, 4],
                                              "data_offsets": [s_q + 4, s_q + 4]}
    p = hc.write_raw(J("layout", "empty_inside.safetensors"), inside, td)
    add("empty_tensor_inside_another", ["scan", base, p], r"'model.layers.0.hidden.weight' starts "
        r"inside tensor .*q_proj", "layout")
    huge = dict(tb)
    huge["model.layers.0.empty.weight"] = {"dtype": "F32", "shape": [0, 2 ** 63],
                                           "data_offsets": [len(td), len(td)]}
    p = hc.write_raw(J("layout", "dim_2_63.safetensors"), huge, td)
    add("dimension_2_63", ["scan", base, p], r"empty.weight.*invalid shape", "layout")
    huge["model.layers.0.empty.weight"] = {"dtype": "F32", "shape": [2 ** 64 + 1, 2 ** 70, 0],
                                           "data_offsets": [len(td), len(td)]}
    p = hc.write_raw(J("layout", "dim_2_70.safetensors"), huge, td)
    add("dimension_2_70", ["scan", base, p], r"empty.weight.*invalid shape", "layout")
    huge["model.layers.0.empty.weight"]["shape"] = [0, 2 ** 62, 4]  # strides overflow int64
    p = hc.write_raw(J("layout", "stride_overflow.safetensors"), huge, td)
    add("empty_tensor_stride_overflow", ["layers", p], r"empty.weight.*invalid shape", "layout")
    text = json.dumps(tb)[:-1] + ', "bad\\udc80name": {"dtype": "F32", "shape": [0], ' \
        f'"data_offsets": [{len(td)}, {len(td)}]}}}}'
    p = hc.write_raw(J("layout", "surrogate_name.safetensors"), text, td)
    add("lone_surrogate_tensor_name", ["scan", base, p], r"not valid Unicode", "layout")
    p = J("layout", "passwd.safetensors")
    with open(p, "wb") as fh:
        fh.write(PASSWD)
    n8 = str(struct.unpack("<Q", PASSWD[:8])[0])
    add("text_file_as_safetensors", ["scan", base, p], r"header length \(first 8 bytes\) exceeds",
        "layout", absent=(n8, "root:x"))
    p = J("layout", "short_text.safetensors")
    with open(p, "wb") as fh:
        fh.write(b"ab\x00\x00\x00\x00\x00\x00" + b"x" * 40)  # length 25185 > file
    add("small_length_past_end", ["scan", base, p], r"header length \(first 8 bytes\) is larger "
        r"than the file", "layout", absent=("25185",))
    # [0, 32] matrices (F32 in the base, F16 in the tuned) are skipped, not decomposed
    t0 = dict(base_t)
    t1 = {n: v + np.float32(0.01) for n, v in base_t.items()}
    for d, t, dt in (("empty0", t0, "F32"), ("empty1", t1, "F16")):
        h, data = hc.layout(t)
        h["model.layers.0.mlp.empty_proj.weight"] = {"dtype": dt, "shape": [0, 32],
                                                     "data_offsets": [len(data), len(data)]}
        hc.write_raw(J(d, "model.safetensors"), h, data)
    add("empty_matrix_pair", ["scan", J("empty0"), J("empty1")], "", "layout")

    # -- paths
    outside = hc.write_st(J("outside", "secret.safetensors"), base_t)
    repo = J("hub", "models--evil--model")
    snap = os.path.join(repo, "snapshots", "0123abcd")
    os.makedirs(snap)
    os.symlink("/", os.path.join(repo, "blobs"))
    os.symlink("../../blobs" + outside, os.path.join(snap, "model.safetensors"))
    add("hub_blobs_symlink_to_root", ["scan", base, snap], r"outside the model directory.*blobs "
        r"is a symlink", "paths")
    repo2 = J("hub", "models--evil--passwd")
    snap2 = os.path.join(repo2, "snapshots", "0123abcd")
    os.makedirs(snap2)
    os.symlink("/", os.path.join(repo2, "blobs"))
    os.symlink("../../blobs" + J("layout", "passwd.safetensors"),
               os.path.join(snap2, "model.safetensors"))
    add("hub_blobs_symlink_to_text", ["scan", base, snap2], r"outside the model directory", "paths",
        absent=(n8, "header length"))
    good = J("hub", "models--ok--model")
    os.makedirs(os.path.join(good, "blobs"))
    os.makedirs(os.path.join(good, "snapshots", "feedbeef"))
    shutil.copy(base, os.path.join(good, "blobs", "9f86d081884c7d65"))
    os.symlink("../../blobs/9f86d081884c7d65",
               os.path.join(good, "snapshots", "feedbeef", "model.safetensors"))
    add("hub_snapshot_control", ["scan", base, os.path.join(good, "snapshots", "feedbeef")], "",
        "paths")
    nb = J("nonutf8-\udcff")  # the bytes b'nonutf8-\xff' on disk
    shutil.copytree(base_dir, nb)
    shutil.copy(base, os.path.join(nb, "x\udcfe.safetensors"))
    add("non_utf8_directory", ["scan", base, nb], r"", "paths")
    add("non_utf8_file", ["scan", base, os.path.join(nb, "x\udcfe.safetensors")], "", "paths")
    add("non_utf8_layers", ["layers", os.path.join(nb, "x\udcfe.safetensors")], "", "paths")
    add("non_utf8_missing", ["scan", base, J("missing-\udcfe")], r"no such file", "paths")
    sh = J("sharded-surrogate")
    hc.write_st(os.path.join(sh, "model-00001-of-00001.safetensors"), base_t)
    hc.write_json(os.path.join(sh, "model.safetensors.index.json"),
                  {"weight_map": {n: "\ud800.safetensors" for n in base_t}})
    add("index_names_lone_surrogate", ["scan", base, sh], r"not a valid file name", "paths")
    sh = J("sharded-nonutf8")
    hc.write_st(os.path.join(sh, "x\udcfe.safetensors"), base_t)
    hc.write_json(os.path.join(sh, "model.safetensors.index.json"),
                  {"weight_map": {n: "x\udcfe.safetensors" for n in base_t}})
    add("index_names_non_utf8_shard", ["scan", base, sh], "", "paths")

    # -- adapters whose merge would differ from PEFT's
    pre = "base_model.model.model.layers.0.self_attn"
    lt = hc.lora_tensors(1)
    mags = {f"{pre}.q_proj.lora_magnitude_vector": np.ones(32, np.float32),
            f"{pre}.v_proj.lora_magnitude_vector": np.ones(16, np.float32)}
    d = hc.write_adapter(J("adapters", "dora_missing"), lt, hc.lora_config(use_dora=True))
    add("dora_without_magnitudes", ["scan", base_dir, d], r"use_dora: true but module "
        r"'model.layers.0.self_attn.(q|v)_proj' has no lora_magnitude_vector", "adapter")
    bad = dict(lt, **mags)
    bad[f"{pre}.v_proj.lora_magnitude_vector"] = np.ones(17, np.float32)
    d = hc.write_adapter(J("adapters", "dora_length"), bad, hc.lora_config(use_dora=True))
    add("dora_magnitude_wrong_length", ["scan", base_dir, d], r"v_proj.lora_magnitude_vector': "
        r"DoRA magnitude has shape \[17\], but module .* has 16 output features", "adapter")
    d = hc.write_adapter(J("adapters", "dora_off"), dict(lt, **mags), hc.lora_config())
    add("magnitudes_with_use_dora_false", ["scan", base_dir, d], "", "adapter")
    two = dict(lt)
    two[f"{pre}.q_proj.lora_A.other.weight"] = lt[f"{pre}.q_proj.lora_A.weight"] * 3
    two[f"{pre}.q_proj.lora_B.other.weight"] = lt[f"{pre}.q_proj.lora_B.weight"] * 3
    d = hc.write_adapter(J("adapters", "two_copies"), two)
    add("second_copy_under_another_adapter_name", ["scan", base_dir, d], r"q_proj.lora_A.weight' "
        r"and '.*q_proj.lora_A.other.weight' are two copies", "adapter")
    mixed = {k.replace("v_proj.lora_A.weight", "v_proj.lora_A.other.weight")
              .replace("v_proj.lora_B.weight", "v_proj.lora_B.other.weight"): v
             for k, v in lt.items()}
    d = hc.write_adapter(J("adapters", "mixed_names"), mixed)
    add("factors_of_two_adapters", ["scan", base_dir, d], r"v_proj.lora_A.other.weight' belongs "
        r"to adapter 'other'.* one file must hold one adapter", "adapter")
    tok = dict(lt, **{"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta":
                      np.ones((3, 32), np.float32)})
    d = hc.write_adapter(J("adapters", "tokens"), tok,
                         hc.lora_config(trainable_token_indices=[3, 5, 7]))
    add("trainable_token_indices", ["scan", base_dir, d], r"adapter_config.json: "
        r"trainable_token_indices", "adapter")
    d = hc.write_adapter(J("adapters", "tokens_tensor_only"), tok)
    add("trainable_tokens_tensor", ["scan", base_dir, d], r"'base_model.model.model.embed_tokens."
        r"token_adapter.trainable_tokens_delta' holds trainable-token rows", "adapter")

    # -- hangs: a key that backtracks exponentially is matched in linear time, as PEFT means it
    for i, key in enumerate(CATASTROPHIC):
        d = hc.write_adapter(J("adapters", f"redos{i}"), lt,
                             hc.lora_config(rank_pattern={key: 2}, alpha_pattern={key: 3.0}))
        add(f"rank_pattern_catastrophic_{i}", ["scan", base_dir, d], "", "hang")
    d = hc.write_adapter(J("adapters", "lookahead"), lt,
                         hc.lora_config(alpha_pattern={"(?=q)q_proj": 4.0}))
    add("alpha_pattern_lookahead", ["scan", base_dir, d], r"alpha_pattern key '\(\?=q\)q_proj' is "
        r"refused: look-ahead", "hang")
    return {"cases": cases, "base": base, "root": root}


# keys on which Python's backtracking engine runs for minutes or forever on ordinary names
CATASTROPHIC = ("(.*.*)*X", "(a|a)*b", "(\\w+\\.?)*!", ".*" * 14 + "X", "((.*)*)*Z")


def _ids():
    with tempfile.TemporaryDirectory() as d:
        return [c.id for c in build(d)["cases"]]


CASE_IDS = _ids()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-io")
    built = build(str(root / "in"))
    built["by_id"] = {c.id: c for c in built["cases"]}
    built["outs"] = str(root / "outs")
    return built


@pytest.fixture(scope="module")
def batch(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("batch")
    jobs = []
    for c in corpus["cases"]:
        out = os.path.join(corpus["outs"], c.id)
        os.makedirs(out)
        jobs.append({"argv": [a.replace("{OUT}", out) for a in c.argv], "cwd": out,
                     "timeout": 60})
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = dict(ENV, INTRUDER_CACHE_DIR=str(work / "cache"))
    subprocess.run([sys.executable, os.path.join(TESTS, "cli_batch.py"), str(work / "jobs.json"),
                    str(work / "results.json")], env=env, check=True, timeout=600)
    return dict(zip([c.id for c in corpus["cases"]],
                    json.loads((work / "results.json").read_text())))


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_cli(case_id, corpus, batch):
    c, r = corpus["by_id"][case_id], batch[case_id]
    assert not r["timed_out"], f"{case_id}: hung"
    if not c.expect:
        assert r["rc"] == 0 and "Traceback" not in r["stderr"], (case_id, r["stderr"][-2000:])
        return
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (case_id, r["stderr"][-2000:])
    assert r["rc"] == 1
    assert re.search(c.expect, lines[0]), (c.expect, lines[0])
    assert not [a for a in c.absent if a in lines[0]], lines[0]
    out = os.path.join(corpus["outs"], case_id)
    assert os.listdir(out) == []


# ---------------------------------------------------------------------- layout (library level)


def test_layout_refusals_name_the_file(corpus):
    for cid in ("gap_between_tensors", "trailing_bytes", "empty_tensor_inside_another"):
        path = corpus["by_id"][cid].argv[2]
        with pytest.raises(CheckpointError, match=re.escape(path)):
            SafetensorsFile(path)


def test_files_written_by_the_safetensors_library_are_accepted(tmp_path):
    """The stricter layout check accepts what the reference writer produces, empty tensors
    included (they sit between the others with zero length)."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    t = {"a": torch.zeros(0, 32), "b": torch.randn(3, 5), "c": torch.zeros(0),
         "d": torch.randn(7).half(), "e": torch.zeros(2, 0, 3)}
    st.save_file(t, str(tmp_path / "ok.safetensors"))
    f = SafetensorsFile(str(tmp_path / "ok.safetensors"))
    for name, want in t.items():
        got = f.read(name)
        assert got.shape == want.shape and torch.equal(got, want)


def test_the_safetensors_library_agrees_on_gaps_and_trailing_bytes(corpus):
    """The refusals match the reference implementation's (it raises on both)."""
    st = pytest.importorskip("safetensors")
    for cid in ("gap_between_tensors", "trailing_bytes", "gap_before_first_tensor"):
        path = corpus["by_id"][cid].argv[2]
        with pytest.raises(Exception):  # noqa: B017  (the library's own error type varies by version)
            with st.safe_open(path, "pt") as fh:
                list(fh.keys())


def test_empty_matrices_are_skipped_with_a_reason(corpus):
    root = corpus["root"]
    p = pair_checkpoints(open_checkpoint(os.path.join(root, "empty0")),
                         open_checkpoint(os.path.join(root, "empty1")))
    skipped = dict(p.skipped)
    assert skipped.get("model.layers.0.mlp.empty_proj.weight", "").startswith("empty matrix")
    assert "model.layers.0.mlp.empty_proj.weight" not in {x.name for x in p.pairs}


# ---------------------------------------------------------------------- paths


def test_non_utf8_names_have_a_fingerprint(corpus):
    nb = os.path.join(corpus["root"], "nonutf8-\udcff", "x\udcfe.safetensors")
    assert len(open_checkpoint(nb).info().fingerprint) == 16


def _unreadable_runner():
    """argv prefix that runs a command without the power to read a mode-000 file, or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    probe = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,"
                            "-dac_read_search", "cat", "/proc/self/status"],
                           capture_output=True, text=True)
    return None if probe.returncode else [setpriv, "--inh-caps=-all",
                                          "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("what", ["file", "model_dir", "file_in_dir", "eval_model_dir"])
def test_unreadable_input_is_one_line(what, tmp_path):
    prefix = _unreadable_runner()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    base = hc.write_st(str(tmp_path / "base" / "model.safetensors"), hc.model_tensors(0))
    tuned = hc.write_st(str(tmp_path / "tuned" / "model.safetensors"), hc.model_tensors(1))
    target = tuned if what in ("file", "file_in_dir") else os.path.dirname(tuned)
    arg = tuned if what == "file" else os.path.dirname(tuned)
    argv = ["scan", base, arg, "-q", "-o", str(tmp_path / "r.json")]
    if what == "eval_model_dir":
        argv = ["eval", arg, "--limit", "1"]
    os.chmod(target, 0)
    try:
        r = subprocess.run(prefix + [sys.executable, "-m", "intruder"] + argv,
                           env=dict(ENV, INTRUDER_CACHE_DIR=str(tmp_path / "c")),
                           capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(target, 0o755)
    lines = [x for x in r.stderr.splitlines() if not x.startswith("loading ")]  # eval's progress
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ") and "ermission denied" in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "r.json")


# ---------------------------------------------------------------------- hangs: pairing


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging for an hour) when the block runs past `seconds`: a generous bound,
    tens of times what linear work needs on a slow shared core."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: not linear")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _fake(names, path="x.safetensors", prefix=""):
    refs = {prefix + n: TensorRef(path, prefix + n, (4, 4), "F32") for n in names}
    return Checkpoint(path, "safetensors", refs, [path])


def test_pairing_200k_tensors_is_linear():
    """200,000 names, half of them matched only after stripping a leading component: a quadratic
    alignment (as before) needs about an hour here; linear work takes about a second."""
    n = 200_000
    names = [f"model.layers.{i // 7}.mlp.p{i % 7}.weight" for i in range(n)]
    base = _fake(names)
    tuned_names = names[: n // 2] + ["transformer." + x for x in names[n // 2:]]
    tuned = _fake(tuned_names, "y.safetensors")
    with deadline(60):
        p = pair_checkpoints(base, tuned)
    assert len(p.pairs) == n and not p.unpaired_base and not p.unpaired_tuned


def test_200k_tensor_header_parses_in_seconds(tmp_path):
    n = 200_000
    header = {f"model.layers.{i}.w": {"dtype": "F32", "shape": [1],
                                      "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    p = hc.write_raw(str(tmp_path / "many.safetensors"), header, b"\0" * (4 * n))
    with deadline(60):
        ck = open_checkpoint(p)
        assert len(ck.refs) == n
        assert len(pair_checkpoints(ck, ck).skipped) == n  # 1-D: paired, not scanned


def test_default_target_rule_per_component_equals_the_regular_expression():
    """The per-component test that replaced a backtracking regular expression (11 us a name)
    selects exactly the names that expression selected."""
    from intruder.io.pairing import _not_linear

    old = re.compile(
        r"(^|\.)(embed_tokens|embed_positions|embeddings?|word_embeddings|position_embeddings|"
        r"token_type_embeddings|wte|wpe|shared|lm_head|embed_out|output_embeddings)(\.|$)"
        r"|(^|\.)(\w*norm\w*|ln_\w+|ln_f)\.")
    parts = ["model", "layers", "0", "q_proj", "weight", "norm", "layernorm", "input_layernorm",
             "ln_", "ln_f", "ln_1", "x-norm", "normé", "embedding", "embeddings", "embed", "wte",
             "lm_head", "shared", "", "a b", "ln_é", "nor", "m", "ln", "embed_out"]
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        name = ".".join(rng.choice(parts, size=rng.integers(1, 6)))
        name += rng.choice(["", "x", ".weight", "norm", "."])
        assert bool(old.search(name)) == _not_linear(name), name


# ---------------------------------------------------------------------- adapters against PEFT


def test_magnitudes_with_use_dora_false_are_ignored_and_listed(corpus):
    d = os.path.join(corpus["root"], "adapters", "dora_off")
    ad = open_checkpoint(d).adapter
    assert all("lora_magnitude_vector" not in parts for parts in ad.modules.values())
    assert sorted(k.rsplit(".", 2)[-2] for k in ad.ignored) == ["q_proj", "v_proj"]
    assert all("use_dora: false" in why for why in ad.ignored.values())


@pytest.fixture(scope="module")
def peft_dora(tmp_path_factory):
    """A one-layer Llama, a DoRA adapter of it written by PEFT (factors and magnitudes made large
    and uneven), and the same adapter with use_dora switched off in its config."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=64, max_position_embeddings=32,
                                       tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)

    d = tmp_path_factory.mktemp("peft-dora")
    make().save_pretrained(d / "base")
    model = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                        target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + torch.rand(p.shape, generator=g))
    model.save_pretrained(d / "dora")
    shutil.copytree(d / "dora", d / "off")
    cfg = json.loads((d / "off" / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (d / "off" / "adapter_config.json").write_text(json.dumps(cfg))
    return d, make


def _peft_merged(make, adapter_dir):
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the magnitudes it does not load
        model = peft.PeftModel.from_pretrained(make(), str(adapter_dir))
    return {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("variant", ["dora", "off"])
def test_merge_follows_use_dora_as_peft_does(variant, peft_dora):
    """With use_dora true the magnitudes rescale the rows; switched off in the config, PEFT
    ignores them and so do we. Both merges equal PEFT's own, and differ from each other."""
    from intruder.io import read_ref
    from intruder.io.adapter import merge_lora

    d, make = peft_dora
    want = _peft_merged(make, d / variant)
    base = open_checkpoint(str(d / "base"))
    pairing = pair_checkpoints(base, open_checkpoint(str(d / variant)))
    lora = [p for p in pairing.pairs if p.lora is not None]
    assert len(lora) == 2
    for p in lora:
        got = merge_lora(base.read(p.name), p.lora, read_ref)
        assert (got - want[p.name]).abs().max() < 1e-5, p.name
        assert (p.lora.magnitude is not None) == (variant == "dora")
    other = _peft_merged(make, d / ("off" if variant == "dora" else "dora"))
    assert max((want[p.name] - other[p.name]).abs().max() for p in lora) > 1e-2


def test_dora_adapter_without_its_magnitudes_is_refused(peft_dora, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = peft_dora
    shutil.copytree(d / "dora", tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = {k: v for k, v in load_file(str(f)).items() if "magnitude" not in k}
    save_file(t, str(f))
    with pytest.raises(AdapterError, match="use_dora: true but module .* has no "
                                           "lora_magnitude_vector"):
        open_checkpoint(str(tmp_path / "a"))


# ---------------------------------------------------------------------- hangs: patterns


def test_catastrophic_keys_match_in_linear_time():
    from intruder.io.pattern import peft_key_pattern

    name = "model.layers.12.self_attn.q_proj" * 4
    with deadline(20):
        for key in CATASTROPHIC:
            assert peft_key_pattern(key).match(name) is False
    with deadline(20):  # and the answer stays PEFT's where it matches
        assert peft_key_pattern(r"(\w+\.?)*").match(name)
        assert peft_key_pattern("(.*.*)*q_proj").match(name)


def test_module_names_from_a_header_are_parsed_in_linear_time():
    """provenance.module_of on names built to make its regular expression backtrack (a line
    break after many 'h.0.' components) or to overflow int() (a 5000-digit block index)."""
    from intruder.provenance import module_of

    with deadline(10):
        assert module_of("h.0." * 200_000 + "\nX.weight")[1] is None
    assert module_of("model.layers." + "9" * 5000 + ".q.weight")[1] is None
    assert module_of("model.layers.3.self_attn.q_proj.weight") == ("self_attn.q_proj", 3)
