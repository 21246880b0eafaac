"""Tests for fixtures/build_demo.py and the committed demo in fixtures/demo/.

The quick build (a few tens of seconds on 2 CPU cores) runs once per module; a second, partial build
with the same seed checks that the tokenizer, the base and one LoRA adapter come out byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "fixtures" / "build_demo.py"
COMMITTED = REPO / "fixtures" / "demo"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _data_dir() -> Path:
    env = os.environ.get("INTRUDER_DATA_DIR")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


needs_data = pytest.mark.skipif(
    not (_data_dir() / "wikitext-2-raw" / "wiki.valid.raw").exists(),
    reason="shared data (WikiText-2, WinoGrande, Social IQa) not found; set INTRUDER_DATA_DIR",
)


def _build(out: Path, *extra: str) -> None:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--quiet", "--out", str(out),
           "--data-dir", str(_data_dir()), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    if not (_data_dir() / "wikitext-2-raw" / "wiki.valid.raw").exists():
        pytest.skip("shared data not found")
    out = tmp_path_factory.mktemp("demo_quick")
    _build(out)
    return out


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _storage_dtype(man: dict):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        man["storage_dtype"]
    ]


def _load_model(path: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


# ------------------------------------------------------------------------------------------------
# Checks shared by the quick build and the committed demo
# ------------------------------------------------------------------------------------------------


def check_manifest_and_files(root: Path) -> None:
    man = _manifest(root)
    assert isinstance(man["seed"], int)
    names = {a["name"] for a in man["artefacts"]}
    expected = {"base", "full_ft", "lora_r1", "lora_r8", "rslora_r64",
                "continual_1", "continual_2", "continual_3"}
    assert expected <= names
    assert {n + "_adapter" for n in expected - {"base", "full_ft"}} <= names
    for a in man["artefacts"]:
        d = root / a["path"]
        assert d.is_dir(), a["path"]
        listed = {f["path"] for f in a["files"]}
        if a["kind"] == "model":
            for f in ("config.json", "model.safetensors", "tokenizer.json"):
                assert f"{a['path']}/{f}" in listed, (a["name"], f)
        else:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                assert f"{a['path']}/{f}" in listed, (a["name"], f)
        for f in a["files"]:
            p = root / f["path"]
            assert p.stat().st_size == f["bytes"], f["path"]
            assert _sha(p) == f["sha256"], f["path"]
        assert a["steps"] > 0
        assert a["final_train_loss"] > 0
        assert a["eval"]["wikitext_token_ppl"] > 1
        assert a["eval"]["heldout_task_loss"] > 0
        assert "lr" in a["hyperparameters"]
        if a["name"] != "base":
            assert a["base"] in names
    assert man["total_bytes"] == sum(f["bytes"] for a in man["artefacts"] for f in a["files"])


def check_models_load(root: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    man = _manifest(root)
    tok = AutoTokenizer.from_pretrained(root / "models" / "base")
    ids = tok("The lobster is a crustacean.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    for a in man["artefacts"]:
        if a["kind"] != "model":
            continue
        cfg = AutoConfig.from_pretrained(root / a["path"])
        assert cfg.model_type == "llama"
        m = _load_model(root / a["path"])
        with torch.no_grad():
            logits = m(input_ids=ids).logits
        assert logits.shape[-1] == cfg.vocab_size
        assert torch.isfinite(logits).all()


def check_adapters_merge_to_stored(root: Path) -> None:
    """PeftModel.from_pretrained(base) + merge_and_unload reproduces the stored merged model."""
    from peft import PeftConfig, PeftModel

    man = _manifest(root)
    dt = _storage_dtype(man)
    adapters = [a for a in man["artefacts"] if a["kind"] == "adapter"]
    assert adapters
    for a in adapters:
        pcfg = PeftConfig.from_pretrained(root / a["path"])
        assert set(pcfg.target_modules) == set(PROJ)
        assert pcfg.use_rslora == (a["method"] == "rslora")
        assert pcfg.r == a["hyperparameters"]["r"]
        base = _load_model(root / "models" / a["base"])
        merged = PeftModel.from_pretrained(base, root / a["path"]).merge_and_unload()
        stored = load_file(str(root / "models" / a["merged_model"] / "model.safetensors"))
        ours = merged.state_dict()
        n_proj = 0
        for k, v in stored.items():
            mine = ours[k].to(dt)
            # The merge's matmul rounds differently on different BLAS code paths: allow one
            # rounding step of the storage dtype (eps * |v|, at least its smallest normal).
            diff = (mine.float() - v.float()).abs()
            ulp = torch.finfo(dt).eps * v.float().abs().clamp_min(torch.finfo(dt).tiny)
            assert bool((diff <= ulp).all()), (a["name"], k, diff.max().item())
            n_proj += any(p in k for p in PROJ)
        assert n_proj == len(PROJ) * base.config.num_hidden_layers
        # The adapter really changed the projections.
        base_sd = load_file(str(root / "models" / a["base"] / "model.safetensors"))
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(base_sd[key], stored[key]), a["name"]


# ------------------------------------------------------------------------------------------------
# Quick build
# ------------------------------------------------------------------------------------------------


@needs_data
def test_quick_manifest_and_files(quick_demo):
    check_manifest_and_files(quick_demo)
    man = _manifest(quick_demo)
    assert man["quick"] is True


@needs_data
def test_quick_models_load(quick_demo):
    check_models_load(quick_demo)


@needs_data
def test_quick_adapters_merge(quick_demo):
    check_adapters_merge_to_stored(quick_demo)


@needs_data
def test_quick_full_ft_changes_every_matrix(quick_demo):
    base = load_file(str(quick_demo / "models" / "base" / "model.safetensors"))
    full = load_file(str(quick_demo / "models" / "full_ft" / "model.safetensors"))
    assert base.keys() == full.keys()
    changed = [k for k in base if not torch.equal(base[k], full[k])]
    assert len(changed) >= len(base) - 1  # everything trained (norm weights may stay tiny)


@needs_data
def test_same_seed_same_bytes(quick_demo, tmp_path):
    """A second build with the same seed gives byte-identical tokenizer, base and LoRA adapter."""
    again = tmp_path / "again"
    _build(again, "--only", "lora_r1")
    for rel in ("models/base/tokenizer.json", "models/base/model.safetensors",
                "adapters/lora_r1/adapter_model.safetensors", "models/lora_r1/model.safetensors"):
        assert _sha(quick_demo / rel) == _sha(again / rel), rel


# ------------------------------------------------------------------------------------------------
# Committed demo
# ------------------------------------------------------------------------------------------------

needs_committed = pytest.mark.skipif(
    not (COMMITTED / "manifest.json").exists(), reason="fixtures/demo not built"
)


@needs_committed
def test_committed_manifest_and_files():
    check_manifest_and_files(COMMITTED)
    man = _manifest(COMMITTED)
    assert man["quick"] is False
    assert man["total_bytes"] < 25_000_000


@needs_committed
def test_committed_models_load():
    check_models_load(COMMITTED)


@needs_committed
def test_committed_adapters_merge():
    check_adapters_merge_to_stored(COMMITTED)
