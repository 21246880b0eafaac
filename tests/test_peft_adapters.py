"""Adapters written by the real `peft` library: scanning the adapter directory gives the same
result as scanning PEFT's own merge_and_unload() output, and our per-tensor merge equals PEFT's."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from intruder.io import open_checkpoint, pair_checkpoints, read_ref  # noqa: E402
from intruder.io.adapter import merge_lora  # noqa: E402
from intruder.scan import run_scan  # noqa: E402
from intruder.types import ScanConfig  # noqa: E402


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _boost(model, factor):
    """Make the LoRA update large enough to create intruders (B is zero-initialised by PEFT)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * factor)
            if "lora_B" in name and p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g))
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=g))


CASES = {
    "lora": (_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), 3.0),
    "rslora_patterns": (_llama, dict(r=8, lora_alpha=16, use_rslora=True,
                                     target_modules=["q_proj", "k_proj", "down_proj"],
                                     rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 4},
                                     alpha_pattern={"down_proj": 4}), 3.0),
    "dora": (_llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"]), 3.0),
    "modules_to_save": (_llama, dict(r=4, lora_alpha=4, target_modules=["gate_proj"],
                                     modules_to_save=["lm_head"]), 3.0),
    "gpt2_conv1d_lora_bias": (_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True, lora_bias=True), 3.0),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def adapter_case(request, tmp_path_factory):
    make, kw, factor = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    base = make()
    base.save_pretrained(d / "base")
    model = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    _boost(model, factor)
    if "modules_to_save" in kw:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.5)
    model.save_pretrained(d / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(d / "merged")
    return request.param, d


def test_adapter_scan_equals_merged_scan(adapter_case):
    name, d = adapter_case
    cfg = ScanConfig(epsilons=(0.5, 0.7, 0.9), include=r"lm_head")
    via_adapter = run_scan(str(d / "base"), str(d / "adapter"), cfg)
    via_merged = run_scan(str(d / "base"), str(d / "merged"), cfg)
    a = {l.name: l for l in via_adapter.layers if l.status == "scanned"}
    m = {l.name: l for l in via_merged.layers if l.status == "scanned"}
    assert a.keys() == m.keys() and len(a) > 0
    for k in a:
        assert [i.index for i in a[k].intruders] == [i.index for i in m[k].intruders], k
        assert max(abs(x - y) for x, y in zip(a[k].max_cos, m[k].max_cos)) < 1e-4, k
        assert a[k].counts_by_epsilon == m[k].counts_by_epsilon
    if name != "modules_to_save":  # the boosted updates create intruders
        assert sum(len(l.intruders) for l in a.values()) > 0


def test_per_tensor_merge_equals_peft(adapter_case):
    name, d = adapter_case
    base = open_checkpoint(str(d / "base"))
    ad = open_checkpoint(str(d / "adapter"))
    merged = open_checkpoint(str(d / "merged"))
    pairing = pair_checkpoints(base, ad, include=r"lm_head")
    n_lora = 0
    for p in pairing.pairs:
        want = merged.read(p.name).double()
        if p.lora is not None:
            got = merge_lora(base.read(p.name), p.lora, read_ref)
            n_lora += 1
        else:
            got = read_ref(p.tuned).double()
        assert (got - want).abs().max() < 1e-5, p.name
    assert n_lora > 0
    if name == "modules_to_save":
        assert any(p.tuned is not None and p.tuned.name.endswith("lm_head.weight")
                   for p in pairing.pairs)
    if name == "gpt2_conv1d_lora_bias":
        from intruder.io.adapter import lora_bias_for

        mod = "transformer.h.0.attn.c_attn"
        ref = lora_bias_for(ad.adapter, mod)
        assert ref is not None
        r, alpha = ad.adapter.rank_alpha(mod)
        got = base.read(mod + ".bias").double() + read_ref(ref).double() * ad.adapter.scaling(mod, r, alpha)
        assert (got - merged.read(mod + ".bias").double()).abs().max() < 1e-6


def test_unconverted_pissa_adapter_is_refused(tmp_path):
    from intruder.errors import AdapterError

    base = _llama()
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                          init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="pissa.*residual base"):
        run_scan(str(tmp_path / "base"), str(tmp_path / "adapter"))
