"""`intruder track` / `intruder compare`: counts along a sequence, persistence, base decomposed
once, adapters chained onto the previous step, CLI output, exit codes and the HTML page."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import synthetic
from click.testing import CliRunner

from intruder.cli import cli

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    """base -> step1 (+ direction in Q0) -> step2 (+ direction in UP1) -> step3 (adapter: +
    direction in DOWN1, applied to step2) -> step4 (back to the base)."""
    out = tmp_path_factory.mktemp("seq")
    base, _, _ = synthetic.llama_pair(seed=0)
    step1 = dict(base)
    step1[Q0] = synthetic.plant(128, 128, [0], 0)[1].astype(np.float32)  # llama_pair seed 0*100+0+0
    step2 = dict(step1)
    step2[UP1] = synthetic.plant(192, 128, [2], 15)[1].astype(np.float32)  # 1*10 + 5
    _, _, parts = synthetic.plant(128, 192, [3], 16)  # 1*10 + 6
    paths = {"base": str(out / "base"), "step1": str(out / "step1.safetensors"),
             "step2": str(out / "step2"), "step3": str(out / "step3-adapter"),
             "step4": str(out / "step4.safetensors")}
    synthetic.write_model_dir(paths["base"], base)
    synthetic.write_safetensors(paths["step1"], step1)
    synthetic.write_model_dir(paths["step2"], step2, shards=2)
    merged = synthetic.write_lora_adapter(paths["step3"], step2, {DOWN1: ([3], parts)}, r=2)
    synthetic.write_safetensors(paths["step4"], base)
    paths["merged3"] = merged
    return paths


def test_track_counts_persistence_and_chaining(seq):
    from intruder.track import run_track

    tr = run_track(seq["base"], [seq[k] for k in ("step1", "step2", "step3", "step4")])
    vb = [sum(len(l.intruders) for l in e.vs_base.layers) for e in tr.entries]
    assert vb == [1, 2, 3, 0]
    where = [sorted(l.name for l in e.vs_base.layers if l.intruders) for e in tr.entries]
    assert where == [[Q0], sorted([Q0, UP1]), sorted([DOWN1, Q0, UP1]), []]
    assert tr.entries[0].vs_previous is None
    vp = [sorted(l.name for l in e.vs_previous.layers if l.intruders) for e in tr.entries[1:]]
    assert vp[:2] == [[UP1], [DOWN1]]  # only what each step added
    # the step-2 vs step-1 report sees Q0 bit-identical
    st = {l.name: l.status for l in tr.entries[1].vs_previous.layers}
    assert st[Q0] == "unchanged" and st[UP1] == "scanned"
    # the adapter step was applied to step 2, not to the base: Q0 and UP1 keep their intruders
    p = [e.persistence for e in tr.entries]
    assert p[0][Q0].new == (0,) and p[0][Q0].persistent == ()
    assert p[1][Q0].persistent == (0,) and p[1][UP1].new == (2,)
    assert p[2][Q0].persistent == (0,) and p[2][UP1].persistent == (2,) and p[2][DOWN1].new == (3,)
    assert all(c > 0.999 for c in p[2][UP1].match_cos)
    assert {n: x.gone for n, x in p[3].items() if x.gone} == {Q0: (0,), UP1: (2,), DOWN1: (3,)}
    # step 3's merged DOWN1 equals the adapter merge written by the fixture
    lay = {l.name: l for l in tr.entries[2].vs_base.layers}
    assert lay[DOWN1].intruders[0].index == 3


def test_compare_decomposes_the_base_once(seq, monkeypatch):
    import intruder.spectral.engine as engine
    from intruder.track import entry_summary, run_compare

    calls = []
    real = engine.base_eig

    def counting(w, *a, **k):
        calls.append(tuple(w.shape))
        return real(w, *a, **k)

    monkeypatch.setattr(engine, "base_eig", counting)
    tr = run_compare(seq["base"], [seq["step1"], seq["step2"], seq["step3"]])
    # changed matrices: Q0 (step1, step2), UP1 (step2), DOWN1 (step3): one base decomposition each
    assert sorted(calls) == sorted([(128, 128), (192, 128), (128, 192)])
    rows = [entry_summary(e, "compare") for e in tr.entries]
    assert [r["intruders"] for r in rows] == [1, 2, 1]  # the adapter applies to the base: DOWN1 only
    assert [r["provenance"]["verdict"] for r in rows] == ["lora-like"] * 3
    assert rows[2]["provenance"]["declared"]["r"] == 2
    # one planted direction; the fixture's padding direction (1e-7 of it) is below resolution
    assert rows[2]["provenance"]["estimated_rank"] == 1


def test_track_cli_table_json_and_html(seq, tmp_path):
    runner = CliRunner()
    out = tmp_path / "t.json"
    html = tmp_path / "t.html"
    res = runner.invoke(cli, ["track", seq["base"], seq["step1"], seq["step2"], seq["step3"],
                              "-o", str(out), "--html", str(html), "-q", "--epsilon", "0.5,0.9"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    row3 = next(l for l in lines if l.lstrip().startswith("3 "))
    assert "step3-adapter" in row3 and "3 3" in row3  # counts at 0.5 and 0.9 vs base
    doc = json.loads(out.read_text())
    assert doc["kind"] == "intruder-track" and len(doc["entries"]) == 3
    e3 = doc["entries"][2]
    assert e3["summary"]["persistent"] == 2 and e3["summary"]["new"] == 1
    assert e3["vs_previous"]["summary"]["total_intruders"] == 1
    assert e3["vs_base"]["schema_version"].startswith("1.")
    assert e3["persistence"][DOWN1]["new"] == [3]
    page = html.read_text()
    assert page.count("<img") == 4 and "<script" not in page and "step3-adapter" in page


def test_compare_cli_exit_codes_and_errors(seq, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "c.json")
    args = ["compare", seq["base"], seq["step1"], seq["step4"], "-o", out, "-q"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "lora-like" in res.output and "unchanged" in res.output
    assert runner.invoke(cli, args + ["--fail-on-intruders"]).exit_code == 3
    res = runner.invoke(cli, ["compare", seq["base"], seq["step4"], "-o", out, "-q",
                              "--fail-on-margin", "0.2"])
    assert res.exit_code == 0  # identical to the base: no scanned matrix, nothing near
    res = runner.invoke(cli, ["compare", seq["base"], seq["step1"], "-o", out, "-q",
                              "--fail-on-strength", "1.0"])
    assert res.exit_code == 4  # the planted Q0 direction is stronger than sigma_10
    res = runner.invoke(cli, ["compare", seq["base"], str(tmp_path / "missing"), "-o", out])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "missing" in res.output
    res = runner.invoke(cli, ["track", seq["base"], seq["step1"], "-o",
                              os.path.join(seq["base"], "x.json")])
    assert res.exit_code == 1 and "inside the input directory" in res.output


def test_persistence_rules():
    import torch

    from intruder.track import _persistence

    eye = torch.eye(4, dtype=torch.float64)  # (d, k): columns are the top vectors
    rot = eye.clone()
    rot[:, 1] = (eye[:, 1] + eye[:, 2]) / 2 ** 0.5  # |cos| 0.707 with both 1 and 2
    p = _persistence(eye, (1, 3), rot, (1, 0))
    assert p.persistent == (1,) and p.new == (0,) and p.gone == (3,)
    assert p.match_cos == (pytest.approx(2 ** -0.5),)
    assert _persistence(None, (), eye, (2,)).new == (2,)
    assert _persistence(eye, (2,), None, ()).gone == (2,)


def test_compare_torchrun_two_ranks_equal_one_process(seq, tmp_path):
    """torchrun --nproc-per-node 2 -m intruder compare (gloo on the CPU): rank 0 writes a
    document equal to a single process's (the fine-tunes' matrices split across the ranks)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out1, out2 = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    args = ["compare", seq["base"], seq["step1"], seq["step2"], seq["step3"], "-q", "--no-cache",
            "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "intruder", *args, "-o", out1], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", "-m", "intruder", *args, "-o", out2], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = json.load(open(out1)), json.load(open(out2))
    assert len(a["entries"]) == len(b["entries"]) == 3
    for ea, eb in zip(a["entries"], b["entries"]):
        la, lb = ea["vs_base"]["layers"], eb["vs_base"]["layers"]
        assert [x["name"] for x in la] == [x["name"] for x in lb]
        for x, y in zip(la, lb):
            assert x["status"] == y["status"] and x.get("max_cos") == y.get("max_cos")
            assert x.get("intruders") == y.get("intruders")
        assert ea["summary"]["intruders"] == eb["summary"]["intruders"]


def test_track_step_with_nan_is_one_line_or_skipped(tmp_path):
    """A step holding NaN: one line naming the tensor and file, or with --allow-nonfinite the
    layer marked nonfinite and the next step compared with the last finite weights (the base)."""
    import torch
    from safetensors.torch import save_file

    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    bad = w.clone()
    bad[3, 4] = float("nan")
    paths = {}
    for label, t in (("base", w), ("nan", bad), ("same", w.clone())):
        paths[label] = str(tmp_path / f"{label}.safetensors")
        save_file({"l.weight": t}, paths[label])
    res = CliRunner().invoke(cli, ["track", paths["base"], paths["nan"], "--no-cache", "-q",
                                   "-o", str(tmp_path / "a.json")])
    assert res.exit_code == 1
    assert "'l.weight'" in res.output and "nan.safetensors" in res.output
    assert "NaN or Inf" in res.output and res.output.strip().count("\n") == 0
    out = str(tmp_path / "b.json")
    res = CliRunner().invoke(cli, ["track", paths["base"], paths["nan"], paths["same"],
                                   "--no-cache", "-q", "--allow-nonfinite", "-o", out])
    assert res.exit_code == 0, res.output
    with open(out) as fh:
        entries = json.load(fh)["entries"]
    assert entries[0]["vs_base"]["layers"][0]["status"] == "nonfinite"
    assert entries[1]["vs_base"]["layers"][0]["status"] == "unchanged"
    assert entries[1]["vs_previous"]["layers"][0]["status"] == "unchanged"
