"""`intruder scale`: the rescaling mathematics, bit-identical copies, output layouts, refusals,
and the literal CLI on a tiny Llama model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import synthetic
import torch
from click.testing import CliRunner

from intruder.cli import cli
from intruder.errors import OutputError, ReportError
from intruder.intervene import rescale_matrix, scale_checkpoint
from intruder.io.safetensors_file import SafetensorsFile
from intruder.report.summary import summary
from intruder.scan import run_scan
from intruder.types import ScanConfig


def _numpy_rescale(wt64: np.ndarray, ranks, alpha: float) -> np.ndarray:
    """Independent float64 reference: LAPACK SVD, then Wt + (alpha-1) sum_j s_j u_j v_j^T."""
    u, s, vt = np.linalg.svd(wt64, full_matrices=False)  # u (m, r), s (r,), vt (r, n)
    i = list(ranks)
    return wt64 + (alpha - 1.0) * (u[:, i] * s[i]) @ vt[i]  # (m, n)


def _within_one_ulp(got: np.ndarray, want64: np.ndarray) -> bool:
    """got (float32) is want64 rounded to float32, up to one unit in the last place."""
    want = want64.astype(np.float32)
    return bool(np.all(np.abs(got.astype(np.float64) - want) <= np.spacing(np.abs(want))))


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _raw(path):
    f = SafetensorsFile(path)
    return {n: f.raw_bytes(n) for n in f.entries}


def _sha(path) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


# ------------------------------------------------------------------------------ mathematics


@pytest.mark.parametrize("m,n,ranks,seed", [(48, 80, [1, 4], 3), (96, 40, [0], 4),
                                            (64, 64, [2, 3, 7], 5)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.7])
def test_rescale_matches_float64_numpy(m, n, ranks, seed, alpha):
    _, wt, _ = synthetic.plant(m, n, ranks, seed)
    # float64 storage: agreement with LAPACK to rounding error
    got64 = rescale_matrix(torch.from_numpy(wt), ranks, alpha).numpy()
    want64 = _numpy_rescale(wt, ranks, alpha)
    assert np.abs(got64 - want64).max() <= 1e-11 * np.abs(wt).max()
    # float32 storage: the float64 result rounded once to float32
    wt32 = wt.astype(np.float32)
    got32 = rescale_matrix(torch.from_numpy(wt32), ranks, alpha)
    assert got32.dtype == torch.float32
    want = _numpy_rescale(wt32.astype(np.float64), ranks, alpha)
    assert _within_one_ulp(got32.numpy(), want)
    # the intervention moved the matrix by exactly |alpha-1| times the intruders' energy
    s = np.linalg.svd(wt32.astype(np.float64), compute_uv=False)
    moved = np.linalg.norm(got32.numpy().astype(np.float64) - wt32)
    assert moved == pytest.approx(abs(alpha - 1) * np.sqrt((s[ranks] ** 2).sum()), rel=1e-5)


def test_rescale_bfloat16_rounds_once():
    _, wt, _ = synthetic.plant(64, 96, [2], 11)
    wt_bf = torch.from_numpy(wt).to(torch.bfloat16)
    got = rescale_matrix(wt_bf, [2], 0.25)
    assert got.dtype == torch.bfloat16
    want = torch.from_numpy(_numpy_rescale(wt_bf.double().numpy(), [2], 0.25)).to(torch.bfloat16)
    # round-to-nearest of (nearly) the same float64 numbers: equal except at rounding ties
    assert (got == want).float().mean().item() > 0.999
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)


def test_alpha_one_is_an_exact_copy():
    _, wt, _ = synthetic.plant(40, 56, [1], 2)
    t = torch.from_numpy(wt.astype(np.float32))
    assert torch.equal(rescale_matrix(t, [1], 1.0), t)


# -------------------------------------------------------------------------- checkpoint level


@pytest.fixture(scope="module")
def file_report(synth):
    return run_scan(synth["base_file"], synth["tuned_file"])


def test_file_outputs_math_copies_and_provenance(synth, file_report, tmp_path):
    outs = [str(tmp_path / "a05.safetensors"), str(tmp_path / "a1.safetensors")]
    res = scale_checkpoint(file_report, [0.5, 1.0], outs)
    truth = synth["truth"]
    tuned_raw = _raw(synth["tuned_file"])
    tuned = _tensors(synth["tuned_file"])
    # alpha = 1: every tensor's stored bytes are the input's
    assert _raw(outs[1]) == tuned_raw
    # alpha = 0.5: untouched tensors bit-identical, intruder layers as numpy computes them
    raw05, t05 = _raw(outs[0]), _tensors(outs[0])
    assert set(raw05) == set(tuned_raw)
    for name in tuned_raw:
        if name in truth:
            want = _numpy_rescale(tuned[name].astype(np.float64), truth[name], 0.5)
            assert _within_one_ulp(t05[name], want), name
            assert raw05[name] != tuned_raw[name]
        else:
            assert raw05[name] == tuned_raw[name], name
    assert {l.name: list(l.indices) for l in res[0].layers} == truth
    assert res[0].n_intruders == 4 and res[0].kind == "file"
    # provenance in the header
    meta = SafetensorsFile(outs[0]).metadata
    assert meta["format"] == "pt"
    assert float(meta["intruder.alpha"]) == 0.5
    assert json.loads(meta["intruder.intruders"]) == truth
    assert float(meta["intruder.epsilon"]) == 0.5 and meta["intruder.top_k"] == "10"
    assert meta["intruder.base"] == synth["base_file"]
    assert meta["intruder.tuned"] == synth["tuned_file"]
    assert meta["intruder.tuned_fingerprint"] == file_report.tuned.fingerprint
    from intruder import __version__

    assert meta["intruder.tool_version"] == __version__
    # the safetensors library reads our stream-written file
    from safetensors import safe_open

    with safe_open(outs[0], framework="pt") as fh:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert np.array_equal(fh.get_tensor(name).numpy(), t05[name])


def test_alpha_zero_removes_intruders_and_keeps_the_rest(synth, file_report, tmp_path):
    out = str(tmp_path / "a0.safetensors")
    scale_checkpoint(file_report, [0.0], [out])
    rep = run_scan(synth["base_file"], out, ScanConfig(epsilons=(0.5, 0.9)))
    s = summary(rep)
    assert s["total_intruders"] == 0 and s["counts_by_epsilon"] == {"0.5": 0, "0.9": 0}
    assert s["layers_scanned"] == 3 and s["layers_unchanged"] == 11
    tuned, new = _tensors(synth["tuned_file"]), _tensors(out)
    for name, ranks in synth["truth"].items():
        ut, st, _ = np.linalg.svd(tuned[name].astype(np.float64), full_matrices=False)
        un, sn, _ = np.linalg.svd(new[name].astype(np.float64), full_matrices=False)
        keep = [j for j in range(20) if j not in ranks]
        # the spectrum without the removed values, and the same singular vectors
        assert np.allclose(sn[:len(keep)], st[keep], rtol=1e-5, atol=1e-6 * st[0])
        cos = np.abs(np.sum(un[:, :len(keep)] * ut[:, keep], axis=0))
        assert cos.min() > 0.9999, name
        # the removed directions are gone: W' has (float32 rounding aside) nothing along them
        left_over = np.linalg.norm(ut[:, ranks].T @ new[name].astype(np.float64), axis=1)
        assert (left_over / st[ranks]).max() < 1e-6


def test_sharded_directory_mirrors_layout_and_companions(synth, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(synth["tuned_sharded"], tuned)
    (tuned / "config.json").write_text('{"model_type": "llama"}\n')
    (tuned / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (tuned / "README.md").write_text("model card\n")
    (tuned / "pytorch_model.bin").write_bytes(b"stale weights")
    (tuned / "extras").mkdir()
    (tuned / "extras" / "big.txt").write_text("not copied\n")
    before = _sha(str(tuned))
    rep = run_scan(synth["base_dir"], str(tuned))
    out = tmp_path / "out"
    scale_checkpoint(rep, [0.0], [str(out)])
    assert _sha(str(tuned)) == before  # input untouched
    names = sorted(os.listdir(out))
    assert names == sorted(["README.md", "config.json", "tokenizer.json",
                            "model.safetensors.index.json"]
                           + [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])
    for f in ("README.md", "config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (tuned / f).read_bytes()
    idx_in = json.loads((tuned / "model.safetensors.index.json").read_text())
    idx_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_in["weight_map"]
    sizes = sum(SafetensorsFile(str(out / f)).entries[n].end - SafetensorsFile(str(out / f)).entries[n].start
                for n, f in idx_out["weight_map"].items())
    assert idx_out["metadata"]["total_size"] == sizes
    assert idx_out["metadata"]["intruder"]["alpha"] == 0.0
    assert idx_out["metadata"]["intruder"]["intruders"] == synth["truth"]
    # each tensor stays in its shard; untouched ones keep their bytes
    truth = synth["truth"]
    for name, shard in idx_in["weight_map"].items():
        a = SafetensorsFile(str(tuned / shard)).raw_bytes(name)
        b = SafetensorsFile(str(out / shard)).raw_bytes(name)
        assert (a == b) == (name not in truth), name
    rescan = run_scan(synth["base_dir"], str(out))
    assert summary(rescan)["total_intruders"] == 0


def _adapter_fixture(root):
    """A 2-shard base with a q_proj bias, and an adapter with LoRA deltas, a lora_B bias and a
    modules_to_save replacement of the embedding."""
    from safetensors.numpy import load_file, save_file

    base, _, truth = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    rng = np.random.default_rng(7)
    bias_name = "model.layers.0.self_attn.q_proj.bias"
    base[bias_name] = rng.standard_normal(128).astype(np.float32)
    base_dir = os.path.join(root, "base")
    synthetic.write_model_dir(base_dir, base, shards=2)
    with open(os.path.join(base_dir, "config.json"), "w") as fh:
        fh.write('{"model_type": "llama"}\n')
    ad = os.path.join(root, "adapter")
    synthetic.write_lora_adapter(ad, base, truth)
    tensors = load_file(os.path.join(ad, "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = \
        rng.standard_normal(128).astype(np.float32)
    tensors["base_model.model.model.embed_tokens.weight"] = \
        rng.standard_normal(base["model.embed_tokens.weight"].shape).astype(np.float32)
    save_file(tensors, os.path.join(ad, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(ad, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(lora_bias=True, modules_to_save=["embed_tokens"])
    json.dump(cfg, open(cfg_path, "w"))
    return base_dir, ad, base, tensors, cfg, truth


def test_adapter_gives_merged_directory(tmp_path):
    base_dir, ad, base, lora, cfg, truth = _adapter_fixture(str(tmp_path))
    before = _sha(ad), _sha(base_dir)
    rep = run_scan(base_dir, ad)
    assert {l.name: [i.index for i in l.intruders] for l in rep.layers if l.intruders} == \
        {k: v[0] for k, v in truth.items()}
    outs = [str(tmp_path / "m1"), str(tmp_path / "m0")]
    scale_checkpoint(rep, [1.0, 0.0], outs)
    assert (_sha(ad), _sha(base_dir)) == before
    scaling = cfg["lora_alpha"] / cfg["r"]
    pre = "base_model.model."
    # alpha = 1: base + deltas, independently merged here in float64
    want = {}
    for name, w in base.items():
        mod = name.rsplit(".", 1)[0]
        a, b = lora.get(f"{pre}{mod}.lora_A.weight"), lora.get(f"{pre}{mod}.lora_B.weight")
        if a is not None and name.endswith(".weight"):
            want[name] = w.astype(np.float64) + scaling * (b.astype(np.float64) @ a.astype(np.float64))
    bias = "model.layers.0.self_attn.q_proj.bias"
    want[bias] = base[bias].astype(np.float64) + scaling * lora[f"{pre}model.layers.0.self_attn.q_proj.lora_B.bias"]
    merged = {}
    idx = json.load(open(os.path.join(outs[0], "model.safetensors.index.json")))
    base_idx = json.load(open(os.path.join(base_dir, "model.safetensors.index.json")))
    assert idx["weight_map"] == base_idx["weight_map"]  # laid out like the base
    assert os.path.isfile(os.path.join(outs[0], "config.json"))
    for shard in set(idx["weight_map"].values()):
        merged.update(_tensors(os.path.join(outs[0], shard)))
    assert set(merged) == set(base)
    emb = "model.embed_tokens.weight"
    assert np.array_equal(merged[emb], lora[pre + emb])  # modules_to_save replacement
    for name, w in base.items():
        if name in want:
            assert np.array_equal(merged[name], want[name].astype(np.float32)), name
        elif name != emb:
            assert np.array_equal(merged[name], w), name
    assert len(want) == 4 and len([n for n in want if n in truth]) == 3
    # alpha = 0: the intruders of the merged float64 matrices rescaled
    m0 = {}
    for shard in set(idx["weight_map"].values()):
        m0.update(_tensors(os.path.join(outs[1], shard)))
    for name, (ranks, _) in truth.items():
        assert _within_one_ulp(m0[name], _numpy_rescale(want[name], ranks, 0.0)), name
    assert np.array_equal(m0[bias], merged[bias]) and np.array_equal(m0[emb], merged[emb])
    rescan = run_scan(base_dir, outs[1])
    assert summary(rescan)["total_intruders"] == 0


# ------------------------------------------------------------------------------- refusals


def test_output_paths_that_touch_inputs_are_refused(synth, file_report, tmp_path):
    before = _sha(synth["tuned_file"]), _sha(synth["tuned_sharded"])
    with pytest.raises(OutputError, match="overwrite the input"):
        scale_checkpoint(file_report, [0.5], [synth["tuned_file"]])
    with pytest.raises(OutputError, match="overwrite the input"):
        scale_checkpoint(file_report, [0.5], [synth["base_file"]])
    link = tmp_path / "link.safetensors"
    os.symlink(synth["tuned_file"], link)
    with pytest.raises(OutputError, match="overwrite the input"):
        scale_checkpoint(file_report, [0.5], [str(link)])
    rep = run_scan(synth["base_dir"], synth["tuned_sharded"])
    with pytest.raises(OutputError, match="inside the input directory"):
        scale_checkpoint(rep, [0.5], [os.path.join(synth["tuned_sharded"], "x")])
    with pytest.raises(OutputError, match="same output"):
        scale_checkpoint(rep, [0.5, 0.25], [str(tmp_path / "o"), str(tmp_path / "o")])
    assert (_sha(synth["tuned_file"]), _sha(synth["tuned_sharded"])) == before

    runner = CliRunner()
    args = ["scale", synth["base_dir"], synth["tuned_sharded"], "--alpha", "0.5", "-q"]
    r = runner.invoke(cli, args + ["-o", os.path.join(synth["tuned_sharded"], "out")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: ")
    assert "inside the input" in r.output
    assert not os.path.exists(os.path.join(synth["tuned_sharded"], "out"))
    out = str(tmp_path / "cli")
    assert runner.invoke(cli, args + ["-o", out]).exit_code == 0
    r = runner.invoke(cli, args + ["-o", out])
    assert r.exit_code == 1 and "already exists (use --force" in r.output
    assert runner.invoke(cli, args + ["-o", out, "--force"]).exit_code == 0
    assert (_sha(synth["tuned_file"]), _sha(synth["tuned_sharded"])) == before


def test_writer_is_atomic_and_checks_the_plan(synth, tmp_path):
    from intruder.io import open_checkpoint
    from intruder.io.writer import CheckpointWriter, plan_like

    ck = open_checkpoint(synth["tuned_sharded"])
    plan = plan_like(ck)
    specs = list(plan.tensors())
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("previous output\n")
    # a tensor never written: error, and the previous output is untouched
    with pytest.raises(OutputError, match="never written"):
        with CheckpointWriter(str(out), plan) as w:
            for s in specs[:-1]:
                w.write(s.name, ck.read(s.name))
    assert os.listdir(out) == ["keep.txt"]
    # out of order, or the wrong dtype: refused before anything lands
    with pytest.raises(OutputError, match="expected tensor"):
        with CheckpointWriter(str(out), plan) as w:
            w.write(specs[1].name, ck.read(specs[1].name))
    with pytest.raises(OutputError, match="planned F32"):
        with CheckpointWriter(str(out), plan) as w:
            w.write(specs[0].name, ck.read(specs[0].name).double())
    assert os.listdir(out) == ["keep.txt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left
    # a complete write replaces it; the shards read back equal
    with CheckpointWriter(str(out), plan, {"k": "v"}) as w:
        for s in specs:
            w.write(s.name, ck.read(s.name))
    back = open_checkpoint(str(out))
    assert set(back.refs) == set(ck.refs) and back.metadata["k"] == "v"
    assert all(torch.equal(back.read(n), ck.read(n)) for n in ck.refs)


def test_report_that_does_not_match_the_checkpoint(synth, file_report, tmp_path):
    import dataclasses

    from intruder.io import open_checkpoint

    # same names, shapes and sizes but other values: caught by the content sha256
    t = _tensors(synth["tuned_file"])
    name = "model.layers.1.mlp.up_proj.weight"
    t[name] = t[name] * np.float32(1.01)
    (tmp_path / "elsewhere").mkdir()
    other = tmp_path / "elsewhere" / os.path.basename(synth["tuned_file"])
    synthetic.write_safetensors(str(other), t)
    with pytest.raises(ReportError, match="content sha256"):
        scale_checkpoint(file_report, [0.5], [str(tmp_path / "o.safetensors")],
                         tuned=str(other))
    # a report from before content hashes (schema 1.1, fingerprint of names and sizes only):
    # the same edit is caught by the sigma check
    old = dataclasses.replace(file_report, **{
        side: dataclasses.replace(getattr(file_report, side), sha256=None, files=(),
                                  fingerprint=open_checkpoint(synth[f"{side}_file"]).header_fingerprint())
        for side in ("base", "tuned")})
    with pytest.raises(ReportError, match="differ from the scan report"):
        scale_checkpoint(old, [0.5], [str(tmp_path / "o.safetensors")], tuned=str(other))
    assert not os.path.exists(tmp_path / "o.safetensors")  # nothing half-written
    # a checkpoint with another layout: caught by the old fingerprint
    del t["model.norm.weight"]
    synthetic.write_safetensors(str(other), t)
    with pytest.raises(ReportError, match="changed since the scan"):
        scale_checkpoint(old, [0.5], [str(tmp_path / "o.safetensors")], tuned=str(other))


def test_epsilon_override_selects_from_recorded_max_cos(synth, file_report, tmp_path):
    from intruder.intervene import select_intruders

    as_lists = lambda sel: {n: list(s.indices) for n, s in sel.items()}  # noqa: E731
    assert as_lists(select_intruders(file_report)) == synth["truth"]
    assert as_lists(select_intruders(file_report, 0.9)) == synth["truth"]
    assert select_intruders(file_report, 0.01) == {}  # nothing has max |cos| below 0.01
    name = "model.layers.1.mlp.up_proj.weight"  # intruders at ranks 2 and 5
    layer = next(l for l in file_report.layers if l.name == name)
    c2, c5 = layer.max_cos[2], layer.max_cos[5]
    sel = select_intruders(file_report, max(c2, c5))  # strict: the larger one is not below
    assert sel[name].indices == ((2,) if c2 < c5 else (5,))
    out = tmp_path / "o.safetensors"
    res = scale_checkpoint(file_report, [0.0], [str(out)], epsilon=max(c2, c5))
    assert json.loads(SafetensorsFile(str(out)).metadata["intruder.intruders"])[name] == \
        list(sel[name].indices)
    assert float(SafetensorsFile(str(out)).metadata["intruder.epsilon"]) == max(c2, c5)
    assert res[0].n_intruders == sum(len(s.indices) for s in sel.values())


# ------------------------------------------------------------------ CLI on a tiny Llama model


def _wikitext(shared_data):
    p = os.path.join(shared_data, "wikitext-2-raw", "wiki.test.raw")
    if not os.path.isfile(p):
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, shared_data):
    """A random 2-layer Llama with a byte-level BPE tokenizer (base), and a copy with one strong
    intruder planted in layers.0.mlp.up_proj (tuned); both saved as Hugging Face directories."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    with open(os.path.join(shared_data, "wikitext-2-raw", "wiki.valid.raw"), encoding="utf-8") as fh:
        lines = [ln for ln in fh.read().split("\n")[:1200] if ln.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base = root / "base"
    model.save_pretrained(base)
    fast.save_pretrained(base)
    sd = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    w0 = sd[name].double().numpy()  # (128, 64)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)  # u (128, 64), s (64,), vt (64, 64)
    # Give the base an exactly null right direction v = vt[-1], then plant c x v^T with x outside
    # the base's column space: Wt's top triplet is exactly (c, x, v), every base triplet stays a
    # triplet of Wt, and alpha = 0 gives back W0 itself (up to float32 rounding).
    w0 = w0 - s[-1] * np.outer(u[:, -1], vt[-1])
    sd[name] = torch.from_numpy(w0).float()
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    tuned = root / "tuned"
    shutil.copytree(base, tuned)
    x = np.random.default_rng(5).standard_normal(128)
    x -= u @ (u.T @ x)
    x /= np.linalg.norm(x)
    sd[name] = torch.from_numpy(w0 + 4.0 * s[0] * np.outer(x, vt[-1])).float()
    save_file(sd, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return {"base": str(base), "tuned": str(tuned), "name": name}


def _rows(doc):
    return {m["label"]: {(r["evaluator"], r["metric"]): r["value"] for r in m["results"]}
            for m in doc["models"]}


def test_cli_scale_after_scan_with_wikitext(tiny_llama, shared_data, tmp_path, monkeypatch):
    """The literal `intruder scale --alpha 0.5 --eval wikitext` after `intruder scan`."""
    monkeypatch.setenv("INTRUDER_WIKITEXT", _wikitext(shared_data))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["scan", tiny_llama["base"], tiny_llama["tuned"], "-q"])
    assert r.exit_code == 0, r.output
    scan = json.load(open("intruder-scan.json"))
    assert {l["name"]: [i["index"] for i in l["intruders"]] for l in scan["layers"]
            if l["intruders"]} == {tiny_llama["name"]: [0]}
    r = runner.invoke(cli, ["scale", "--alpha", "0.5", "--eval", "wikitext-sliding", "--limit",
                            "1", "--save-alpha", "0.5"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "intruder-scale"
    model = out / "alpha-0.5"
    assert sorted(os.listdir(model)) == sorted(os.listdir(tiny_llama["tuned"]))
    for f in os.listdir(model):
        if f != "model.safetensors":
            assert (model / f).read_bytes() == open(os.path.join(tiny_llama["tuned"], f), "rb").read()
    doc = json.load(open(out / "scale-results.json"))
    rows = _rows(doc)
    assert list(rows) == ["base", "tuned", "alpha=0.5"]
    wp = ("wikitext", "word_perplexity")
    assert all(wp in v and np.isfinite(v[wp]) for v in rows.values())
    assert len({rows[k][wp] for k in rows}) == 3  # three different models
    assert doc["models"][2]["n_intruders"] == 1 and doc["alphas"] == [0.5]
    # the table names the protocol of every metric column
    assert "wikitext word_perplexity" in r.stdout
    assert re.search(r"lm-eval wikitext[^\n]*: 1 detokenized wikitext-2-raw-v1 test articles", r.stdout)
    assert "perplexity per word" in r.stdout
    lines = open(out / "scale-results.csv").read().splitlines()
    assert lines[0].startswith("model,role,alpha,path,intruders_scaled,evaluator,metric,value")
    assert len(lines) == 1 + 3 * 4  # 3 models x 4 wikitext metrics
    assert open(out / "scale-tradeoff.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_scan_then_sweep_with_task(tiny_llama, shared_data, tmp_path, monkeypatch):
    """`intruder scale BASE TUNED --alpha 0,1 --eval wikitext --eval task:... -o out/`."""
    monkeypatch.setenv("INTRUDER_WIKITEXT", _wikitext(shared_data))
    task = os.path.join(shared_data, "social_i_qa", "test.json")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["scale", tiny_llama["base"], tiny_llama["tuned"], "--alpha",
                                 "0,1", "--eval", "wikitext", "--eval", f"task:{task}",
                                 "--limit", "2", "-o", str(out), "--json", "-q",
                                 "--save-alpha", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert os.path.isfile(out / "intruder-scan.json")
    rows = _rows(doc)
    assert list(rows) == ["base", "tuned", "alpha=0", "alpha=1"]
    wp = ("wikitext", "word_perplexity")
    acc = ("task:social_i_qa", "accuracy")
    assert acc in rows["base"] and 0.0 <= rows["base"][acc] <= 1.0
    assert rows["alpha=1"] == rows["tuned"]  # bit-identical weights
    # removing the planted intruder gives the base back, up to float32 rounding of the weights
    assert abs(rows["alpha=0"][wp] - rows["base"][wp]) < 0.01 * abs(rows["tuned"][wp] - rows["base"][wp])
    assert _raw(str(out / "alpha-1" / "model.safetensors")) == \
        _raw(os.path.join(tiny_llama["tuned"], "model.safetensors"))
    assert doc["files"]["plot"].endswith("scale-tradeoff.png")
    assert os.path.getsize(doc["files"]["plot"]) > 1000


def test_cli_unknown_evaluator_fails_before_writing(synth, tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["scale", synth["base_file"], synth["tuned_file"], "--alpha",
                                 "0.5", "--eval", "wikitxt", "-o", str(out), "-q"])
    assert r.exit_code == 1 and "did you mean 'wikitext'" in r.output
    assert not os.path.exists(out)


def test_cli_scale_html_audit(synth, tmp_path):
    """`scale --html` writes the audit; a --html path onto an input is refused before any model."""
    runner = CliRunner()
    out = tmp_path / "scaled"
    r = runner.invoke(cli, ["scale", synth["base_file"], synth["tuned_file"], "--alpha", "0",
                            "-o", str(out), "--html", str(tmp_path / "a.html"), "-q"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "a.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "model.layers.1.mlp.up_proj" in page
    r = runner.invoke(cli, ["scale", synth["base_file"], synth["tuned_file"], "--alpha", "0",
                            "-o", str(tmp_path / "other"), "--html", synth["tuned_file"], "-q"])
    assert r.exit_code == 1 and "overwrite the input" in r.stderr
    assert not (tmp_path / "other").exists()
