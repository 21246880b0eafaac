"""Every input kind gives the same, exact answer on the planted suite; pairing is by name."""

from __future__ import annotations

import os

import numpy as np
import pytest
import synthetic
import torch

from intruder.errors import CheckpointError, NonFiniteError, PairingError
from intruder.report.summary import summary
from intruder.scan import run_scan
from intruder.types import ScanConfig


def _found(report):
    return {l.name: [i.index for i in l.intruders] for l in report.layers if l.intruders}


@pytest.mark.parametrize("base_key,tuned_key", [
    ("base_file", "tuned_file"),
    ("base_dir", "tuned_sharded"),
    ("base_sharded", "tuned_file"),
    ("base_dir", "adapter"),
    ("base_sharded", "adapter"),
])
def test_planted_found_for_each_input_kind(synth, base_key, tuned_key):
    rep = run_scan(synth[base_key], synth[tuned_key], ScanConfig(epsilons=(0.5, 0.9)))
    assert _found(rep) == synth["truth"]
    s = summary(rep)
    assert s["total_intruders"] == 4 and s["counts_by_epsilon"]["0.5"] == 4
    # untouched matrices are reported unchanged, not decomposed
    assert {l.status for l in rep.layers if l.name not in synth["truth"]} == {"unchanged"}
    assert s["layers_scanned"] == 3 and s["layers_unchanged"] == 11


def test_dense_full_finetune_like_has_none(synth):
    rep = run_scan(synth["base_file"], synth["dense_file"], ScanConfig(epsilons=(0.5, 0.7, 0.9)))
    s = summary(rep)
    assert s["layers_scanned"] == 14 and s["total_intruders"] == 0
    assert s["counts_by_epsilon"] == {"0.5": 0, "0.7": 0, "0.9": 0}


def test_pairing_is_by_name_not_position(tmp_path, synth):
    base, tuned, truth = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    shuffled = dict(reversed(list(tuned.items())))
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), shuffled)
    rep = run_scan(synth["base_file"], str(tmp_path / "t.safetensors"))
    assert _found(rep) == synth["truth"]


def test_prefix_difference_is_aligned(tmp_path, synth):
    """'transformer.'-style extra leading component on one side still pairs uniquely."""
    base, tuned, _ = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    renamed = {"wrapper." + k: v for k, v in tuned.items()}
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), renamed)
    rep = run_scan(synth["base_file"], str(tmp_path / "t.safetensors"))
    assert {k.replace("wrapper.", ""): v for k, v in _found(rep).items()} == synth["truth"]


def test_unpaired_listed_never_zero_filled(tmp_path, synth):
    base, tuned, _ = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    del tuned["model.layers.1.mlp.down_proj.weight"]
    tuned["model.layers.1.mlp.extra_proj.weight"] = np.ones((4, 4), np.float32)
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), tuned)
    rep = run_scan(synth["base_file"], str(tmp_path / "t.safetensors"))
    assert rep.unpaired_base == ("model.layers.1.mlp.down_proj.weight",)
    assert rep.unpaired_tuned == ("model.layers.1.mlp.extra_proj.weight",)
    assert "model.layers.1.mlp.down_proj.weight" not in [l.name for l in rep.layers]


def test_shape_mismatch_names_both_tensors(tmp_path, synth):
    base, tuned, _ = synthetic.llama_pair(seed=0)
    tuned["model.layers.0.self_attn.q_proj.weight"] = np.zeros((128, 64), np.float32)
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), tuned)
    with pytest.raises(PairingError, match=r"q_proj.weight.*\[128, 128\].*\[128, 64\]"):
        run_scan(synth["base_file"], str(tmp_path / "t.safetensors"))


def test_no_names_in_common(tmp_path, synth):
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), {"a.b": np.ones((3, 3), np.float32)})
    with pytest.raises(PairingError, match="no tensor names in common"):
        run_scan(synth["base_file"], str(tmp_path / "t.safetensors"))


def test_nonfinite_is_an_error_unless_allowed(tmp_path, synth):
    base, tuned, _ = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    tuned["model.layers.0.mlp.gate_proj.weight"] = tuned["model.layers.0.mlp.gate_proj.weight"].copy()
    tuned["model.layers.0.mlp.gate_proj.weight"][3, 4] = np.nan
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), tuned)
    with pytest.raises(NonFiniteError, match="gate_proj.weight"):
        run_scan(synth["base_file"], str(tmp_path / "t.safetensors"))
    rep = run_scan(synth["base_file"], str(tmp_path / "t.safetensors"),
                   ScanConfig(allow_nonfinite=True))
    assert ("model.layers.0.mlp.gate_proj.weight", "non-finite weights (--allow-nonfinite)") in rep.skipped
    assert _found(rep) == synth["truth"]


def test_include_exclude(synth):
    rep = run_scan(synth["base_file"], synth["tuned_file"],
                   ScanConfig(exclude=r"mlp\.", include=r"embed_tokens"))
    names = [l.name for l in rep.layers]
    assert "model.embed_tokens.weight" in names
    assert not any(".mlp." in n for n in names)
    assert _found(rep) == {"model.layers.0.self_attn.q_proj.weight": [0]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    base, tuned, truth = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    synthetic.write_safetensors(str(tmp_path / "b.safetensors"), base, dtype)
    synthetic.write_safetensors(str(tmp_path / "t.safetensors"), tuned, dtype)
    rep = run_scan(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"))
    assert _found(rep) == {k: v[0] for k, v in truth.items()}
    assert rep.base.dtypes == ({"bfloat16": "BF16", "float16": "F16"}[dtype],)


def test_pickle_state_dict_weights_only(tmp_path, synth):
    base, tuned, truth = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    torch.save({k: torch.from_numpy(v) for k, v in tuned.items()}, tmp_path / "tuned.bin")
    rep = run_scan(synth["base_file"], str(tmp_path / "tuned.bin"))
    assert _found(rep) == synth["truth"]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, synth):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    with open(tmp_path / "evil.bin", "wb") as fh:
        pickle.dump({"model.layers.0.self_attn.q_proj.weight": Evil()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        run_scan(synth["base_file"], str(tmp_path / "evil.bin"))
    assert not marker.exists()


def test_adapter_as_base_is_refused(synth):
    with pytest.raises(CheckpointError, match="only be the TUNED side"):
        run_scan(synth["adapter"], synth["tuned_file"])


def test_derivation_warning_for_unrelated_models(tmp_path, synth):
    base, _, _ = synthetic.llama_pair(seed=0)
    other, _, _ = synthetic.llama_pair(seed=99)
    synthetic.write_safetensors(str(tmp_path / "o.safetensors"), other)
    rep = run_scan(synth["base_file"], str(tmp_path / "o.safetensors"))
    assert rep.warnings and "does not look derived" in rep.warnings[0]
    rep2 = run_scan(synth["base_file"], synth["tuned_file"])
    assert rep2.warnings == ()
