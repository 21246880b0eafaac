"""`intruder scan` and `intruder layers` through click's CliRunner: output, JSON, exit codes, errors."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from intruder.cli import cli
from intruder.report.schema import load_report, validate


@pytest.fixture()
def runner():
    return CliRunner()


def test_scan_table_and_report_file(runner, synth, tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(cli, ["scan", synth["base_file"], synth["tuned_file"], "-o", str(out),
                              "--epsilon", "0.5,0.9", "-q"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    row = next(l for l in lines if l.startswith("model.layers.1.mlp.up_proj.weight"))
    assert row.split()[1:4] == ["192x128", "2", "2,5"]
    assert "total intruders: 4" in res.stdout
    assert "eps 0.5: 4  eps 0.9: 4" in res.stdout
    assert "Algorithm 1" in res.stdout and "epsilon = 0.5" in res.stdout
    doc = json.loads(out.read_text())
    validate(doc)
    assert doc["summary"]["total_intruders"] == 4
    assert doc["summary"]["counts_by_epsilon"] == {"0.5": 4, "0.9": 4}
    assert doc["config"] == {**doc["config"], "top_k": 10, "epsilon": [0.5, 0.9]}
    up = next(l for l in doc["layers"] if l["name"] == "model.layers.1.mlp.up_proj.weight")
    assert [i["index"] for i in up["intruders"]] == [2, 5]
    assert len(up["max_cos"]) == 10 and all(0 <= c <= 1 for c in up["max_cos"])
    rep = load_report(str(out))
    assert sum(len(l.intruders) for l in rep.layers) == 4


def test_scan_default_output_in_cwd(runner, synth):
    with runner.isolated_filesystem():
        res = runner.invoke(cli, ["scan", synth["base_file"], synth["tuned_file"], "-q"])
        assert res.exit_code == 0
        assert os.path.exists("intruder-scan.json")


def test_scan_json_stdout_is_one_document(runner, synth, tmp_path):
    res = runner.invoke(cli, ["scan", synth["base_dir"], synth["adapter"], "--json",
                              "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == "1.0" or doc["schema_version"].startswith("1.")
    assert doc["tuned"]["kind"] == "adapter"
    assert doc["summary"]["total_intruders"] == 4


def test_fail_on_intruders_exit_code(runner, synth, tmp_path):
    args = ["-o", str(tmp_path / "r.json"), "-q", "--fail-on-intruders"]
    assert runner.invoke(cli, ["scan", synth["base_file"], synth["tuned_file"]] + args).exit_code == 3
    assert runner.invoke(cli, ["scan", synth["base_file"], synth["dense_file"]] + args).exit_code == 0


@pytest.mark.parametrize("args,needle", [
    (["scan", "/nonexistent/base.safetensors", "{tuned}"], "/nonexistent/base.safetensors: no such file"),
    (["scan", "{base}", "{tuned}", "--epsilon", "1.5"], "--epsilon values must lie in (0, 1]"),
    (["scan", "{base}", "{tuned}", "--include", "("], "--include '(': not a valid regular expression"),
    (["scan", "{base}", "{tuned}", "--device", "tpu"], "--device"),
    (["scan", "{base}", "{tuned}", "-o", "{tuned}"], "output would overwrite the input"),
])
def test_errors_are_one_line_exit_1(runner, synth, args, needle):
    args = [a.format(base=synth["base_file"], tuned=synth["tuned_file"]) for a in args]
    res = runner.invoke(cli, args)
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and needle in err[0], err
    assert "Traceback" not in res.output


def test_debug_shows_the_exception(runner, synth):
    res = runner.invoke(cli, ["--debug", "scan", "/nonexistent.safetensors", synth["tuned_file"]])
    assert res.exit_code != 0 and res.exception is not None


def test_usage_error_exit_2(runner, synth):
    res = runner.invoke(cli, ["scan", synth["base_file"]])
    assert res.exit_code == 2


def test_layers_model_and_adapter(runner, synth):
    res = runner.invoke(cli, ["layers", synth["tuned_sharded"]])
    assert res.exit_code == 0
    assert "model.layers.0.self_attn.q_proj.weight  128x128  F32    model-00001-of-00003.safetensors" in res.stdout
    assert "embed_tokens" not in res.stdout  # not a scan target unless --all
    res = runner.invoke(cli, ["layers", synth["tuned_sharded"], "--all"])
    assert "model.embed_tokens.weight" in res.stdout
    res = runner.invoke(cli, ["layers", synth["adapter"], "--json"])
    doc = json.loads(res.stdout)
    assert doc["kind"] == "adapter"
    mods = {t["name"]: t for t in doc["tensors"]}
    assert mods["model.layers.1.mlp.up_proj"]["lora_rank"] == 4
    assert mods["model.layers.1.mlp.up_proj"]["scaling"] == 2.0
    assert mods["model.layers.1.mlp.up_proj"]["shape"] == [192, 128]


def test_outputs_get_ordinary_permissions(runner, synth, tmp_path):
    """Atomic writes go through mkstemp (0600); the final file follows the umask like any other."""
    import stat

    out = tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        res = runner.invoke(cli, ["scan", synth["base_file"], synth["tuned_file"], "-o", str(out), "-q"])
    finally:
        os.umask(old)
    assert res.exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
