"""The Python API as a notebook uses it, on the bundled demo models (fixtures/demo).

In-memory scans equal path scans of the same files; rescale in memory equals `intruder scale`
tensor for tensor; the rescaled model runs through lm-eval's HFLM; the one verdict reads the same
in the terminal, the JSON, the HTML banner and the API; every report the tool writes passes the
published JSON Schema under jsonschema's Draft 2020-12 validator.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from html import escape

import pytest
import torch

import intruder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "fixtures", "demo")
BASE = os.path.join(DEMO, "models", "base")
ADAPTER = os.path.join(DEMO, "adapters", "lora_r8")
FAST = dict(no_cache=True, device="cpu")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _cli(*args):
    """The command line, in this process (click's runner): stdout as the terminal shows it."""
    from click.testing import CliRunner

    from intruder.cli import cli

    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, (r.output[-2000:], r.exception)
    return r


@pytest.fixture(scope="module")
def base_model():
    return transformers.AutoModelForCausalLM.from_pretrained(BASE)  # float16, as stored


@pytest.fixture(scope="module")
def peft_model():
    inner = transformers.AutoModelForCausalLM.from_pretrained(BASE)
    return peft.PeftModel.from_pretrained(inner, ADAPTER)


@pytest.fixture(scope="module")
def low_alpha(tmp_path_factory):
    """The demo's LoRA r=8 adapter with lora_alpha lowered 16 -> 1: the same low-rank update at
    1/16 of its size, with no intruder at epsilon 0.5."""
    d = tmp_path_factory.mktemp("lowalpha") / "lora_r8_alpha1"
    shutil.copytree(ADAPTER, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16
    cfg["lora_alpha"] = 1
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return str(d)


def _layers_by_name(r):
    return {l.name: dataclasses.replace(l, seconds=0.0) for l in r.layers}


# ---------------------------------------------------------------------- the notebook scenario


def test_in_memory_scan_equals_path_scan(base_model, peft_model):
    r = intruder.scan(base_model, peft_model, **FAST)
    ref = intruder.scan(BASE, ADAPTER, **FAST)
    assert isinstance(r, intruder.ScanResult)
    assert _layers_by_name(r) == _layers_by_name(ref)
    assert r.verdict.wording == ref.verdict.wording and r.verdict.label == "lora-like"
    assert r.tuned.kind == "adapter" and r.tuned.adapter["r"] == 8
    # a state dict, and the PeftModel's own (wrapped, LoRA-injected) base as BASE
    sd = intruder.scan(dict(base_model.state_dict()), peft_model, **FAST)
    inner = intruder.scan(peft_model.get_base_model(), peft_model, **FAST)
    assert _layers_by_name(sd) == _layers_by_name(inner) == _layers_by_name(ref)
    # the inputs are untouched
    assert all(not p.requires_grad or p.grad is None for p in base_model.parameters())


def test_dataframe_covers_every_per_matrix_json_field(peft_model):
    r = intruder.scan(BASE, peft_model, **FAST)
    df = r.to_dataframe()
    doc = r.to_dict()
    fields = set().union(*(d.keys() for d in doc["layers"]))
    nested = {"intruders"}  # one row per intruder: r.to_dataframe("intruder")
    assert fields - nested <= set(df.columns), fields - nested - set(df.columns)
    row = df.set_index("name").loc["model.layers.0.self_attn.q_proj.weight"]
    layer = next(d for d in doc["layers"] if d["name"] == row.name)
    for k in ("novel_strength", "delta_rank", "cos_margin", "weight_cos", "delta_floor"):
        assert row[k] == layer[k], k
    assert list(row["max_cos"]) == layer["max_cos"]
    assert row["update"] in ("low-rank", "dense", "unresolved", "precision-only", "saturated")
    per_intr = r.to_dataframe("intruder")
    assert len(per_intr) == r.summary["total_intruders"]


def test_rescale_in_memory_equals_cli_scale(tmp_path, base_model, peft_model):
    from safetensors.torch import load_file

    r = intruder.scan(base_model, peft_model, **FAST)
    scan_json = r.save(tmp_path / "scan.json")  # report of the in-memory scan, re-read below
    _cli("scale", BASE, ADAPTER, "--alpha", "0.5", "-o", str(tmp_path / "out"), "-q")
    files = glob.glob(str(tmp_path / "out" / "alpha-0.5*" / "*.safetensors"))
    assert len(files) == 1, os.listdir(tmp_path / "out")
    written = load_file(files[0])
    scaled = intruder.rescale(peft_model, intruder.load_report(scan_json), 0.5)
    assert not hasattr(scaled, "peft_config")  # a plain transformers model
    sd = scaled.state_dict()
    assert set(written) <= set(sd)
    changed = 0
    for name, t in written.items():
        assert sd[name].dtype == t.dtype, name
        assert torch.equal(sd[name], t), name
        changed += not torch.equal(t, base_model.state_dict()[name])
    assert changed == 28  # every LoRA-merged matrix
    # the PeftModel is left as it was
    assert isinstance(peft_model, peft.PeftModel) and peft_model.active_adapter == "default"
    # full model and state dict inputs
    full = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(DEMO, "models", "lora_r8"))
    rf = intruder.scan(base_model, full, **FAST)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    m0 = intruder.rescale(full, rf, 0.0)
    d0 = intruder.rescale(dict(full.state_dict()), rf, 0.0)
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    assert all(torch.equal(m0.state_dict()[k], d0[k]) for k in d0)
    assert sum(not torch.equal(before[k], d0[k]) for k in d0) == len(
        [l for l in rf.layers if l.intruders])


def test_rescaled_model_runs_through_lm_eval_hflm(tmp_path, shared_data, peft_model, monkeypatch):
    """The in-memory rescaled model goes into lm-eval's HFLM as `pretrained=` and gives the
    same WikiText numbers as our evaluator on it and as HFLM on the `intruder scale` output."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from intruder.evaluate.data import load_wikitext

    wiki = os.path.join(shared_data, "wikitext-2-raw", "wiki.test.raw")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"page": d.text}) + "\n"
                            for d in load_wikitext(wiki).documents[:1]))
    (tmp_path / "tasks").mkdir()
    packaged = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "wikitext", "wikitext.yaml")
    (tmp_path / "tasks" / "wikitext_local.yaml").write_text(
        f"include: {packaged}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = intruder.scan(BASE, peft_model, **FAST)
    model = intruder.rescale(peft_model, r, 0.5).float()
    tok = transformers.AutoTokenizer.from_pretrained(BASE)
    hflm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8, add_bos_token=False)
    out = simple_evaluate(model=hflm, tasks=["wikitext_local"], num_fewshot=0, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                   include_defaults=False),
                          log_samples=False, verbosity="ERROR")
    theirs = out["results"]["wikitext_local"]["word_perplexity,none"]
    ours = {x.metric: x.value for x in intruder.evaluate(
        model, f"wikitext:{wiki}", tokenizer=tok, limit=1, device="cpu")}
    assert ours["word_perplexity"] == pytest.approx(theirs, rel=1e-4)
    assert 1 < theirs < 1e6


# -------------------------------------------------------------------------------- the verdict


def test_lowered_alpha_verdict_is_the_same_everywhere(tmp_path, low_alpha):
    out = tmp_path / "scan.json"
    html = tmp_path / "audit.html"
    p = _cli("scan", BASE, low_alpha, "-o", str(out), "--html", str(html), "--no-cache")
    api = intruder.scan(BASE, low_alpha, **FAST).verdict
    v = api.wording
    assert v.startswith("LoRA-like update (rank 8), no intruders at epsilon 0.5 yet: margin ")
    assert api.label == "lora-like" and api.intruders == 0 and not api.agree
    assert api.margin == pytest.approx(api.lowest_max_cos - 0.5) and api.margin > 0
    assert f"verdict: {v}  [lora-like, confidence {api.confidence:.2f}]" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["verdict"]["wording"] == v and doc["verdict"]["label"] == "lora-like"
    banner = re.search(r'<div class="verdict (\w+)" id="verdict" data-label="([\w-]+)">'
                       r'<p class="headline">(.*?)</p>', html.read_text())
    assert banner.group(3) == escape(v) and banner.group(2) == "lora-like"
    assert banner.group(1) == "lowrank"  # not the green "none" banner
    assert intruder.load_report(out).verdict == api
    assert "Full-fine-tuning-like" not in html.read_text().split('id="verdict"')[1][:400]


@pytest.mark.parametrize("name, label, intruders", [
    ("full_ft", "full-ft-like", False), ("lora_r1", "lora-like", True),
    ("lora_r8", "lora-like", True), ("rslora_r64", "lora-like", True)])
def test_verdict_on_the_demo_set(name, label, intruders):
    r = intruder.scan(BASE, os.path.join(DEMO, "models", name), **FAST)
    v = r.verdict
    assert v.label == label and (v.intruders > 0) == intruders and v.agree
    assert v.confidence >= 0.9
    if label == "full-ft-like":
        assert v.wording.startswith("Full-fine-tuning-like update (dense in 28 of 28 changed "
                                    "matrices), no intruders at epsilon 0.5: margin ")
    else:
        assert re.match(r"LoRA-like update \(rank \d+\): \d+ intruders at epsilon 0.5 in \d+ of "
                        r"28 changed matrices", v.wording), v.wording


def test_unchanged_and_count_only_reports():
    same = intruder.scan(BASE, BASE, **FAST)
    assert same.verdict.label == "unchanged"
    # a 1.1 report without the verdict (committed demo output) gets one computed on load
    old = intruder.load_report(os.path.join(ROOT, "reports", "demo", "lora_r8-scan.json"))
    assert old.verdict.label == "lora-like" and old.verdict.intruders == 83


# ----------------------------------------------------------------------------------- schema


def _validate(doc):
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(intruder.SCHEMA)
    errors = list(Draft202012Validator(intruder.SCHEMA).iter_errors(doc))
    assert not errors, [(list(e.absolute_path), e.message) for e in errors[:5]]


def test_schema_validates_every_report_the_tool_writes(tmp_path, low_alpha):
    m = os.path.join(DEMO, "models")
    _cli("scan", BASE, low_alpha, "-o", str(tmp_path / "scan.json"), "--no-cache", "-q")
    _cli("scan", BASE, os.path.join(m, "full_ft"), "-o", str(tmp_path / "full.json"),
         "--no-cache", "-q", "--epsilon", "0.5,0.9", "--vectors", "both")
    _cli("compare", BASE, os.path.join(m, "lora_r1"), low_alpha, "-o",
         str(tmp_path / "compare.json"), "--no-cache", "-q")
    _cli("track", BASE, *(os.path.join(m, f"continual_{i}") for i in (1, 2)), "-o",
         str(tmp_path / "track.json"), "--no-cache", "-q")
    _cli("scale", "--scan", str(tmp_path / "scan.json"), "--alpha", "0.5", "-o",
         str(tmp_path / "scaled"), "-q", "--eval", "task:" + _held_text(tmp_path), "--limit", "2")
    written = sorted(glob.glob(str(tmp_path / "*.json")) + glob.glob(str(tmp_path / "scaled" / "*.json")))
    assert len(written) == 5, written
    committed = sorted(glob.glob(os.path.join(ROOT, "reports", "demo", "*.json")))
    assert len(committed) >= 9
    for path in written + committed:
        with open(path) as fh:
            _validate(json.load(fh))
        intruder.load_report(path)  # and the loader takes it


def _held_text(tmp_path):
    p = tmp_path / "held.txt"
    p.write_text("The cat sat on the mat.\nA second line of held-out text.\n")
    return str(p)


def test_schema_refuses_what_it_should():
    from jsonschema import Draft202012Validator

    with open(os.path.join(ROOT, "reports", "demo", "full_ft-scan.json")) as fh:
        doc = json.load(fh)
    v = Draft202012Validator(intruder.SCHEMA)
    assert not list(v.iter_errors(doc))
    for edit in (lambda d: d["layers"][0]["max_cos"].__setitem__(0, "0.2"),
                 lambda d: d["config"].__setitem__("top_k", 0),
                 lambda d: d["summary"]["provenance"].__setitem__("verdict", "good"),
                 lambda d: d["layers"][0].__setitem__("delta_rank", 1.5),
                 lambda d: d.__delitem__("layers")):
        bad = json.loads(json.dumps(doc))
        edit(bad)
        assert list(v.iter_errors(bad))


def test_saved_report_loads_back_equal(tmp_path, peft_model):
    r = intruder.scan(BASE, peft_model, epsilon=[0.5, 0.9], **FAST)
    back = intruder.load_report(r.save(tmp_path / "r.json"))
    assert isinstance(back, intruder.ScanResult)
    assert back == r
    assert back.to_dict() == r.to_dict()
    info = back.to_html(tmp_path / "r.html", similarity=False)
    assert info.figures > 0 and escape(r.verdict.wording) in (tmp_path / "r.html").read_text()


def test_compare_and_track_in_memory(tmp_path, base_model, peft_model):
    m = os.path.join(DEMO, "models")
    c = intruder.compare(base_model, {"adapter": peft_model, "full": os.path.join(m, "full_ft")},
                         **FAST)
    assert c.labels == ["adapter", "full"]
    assert c["adapter"].verdict.label == "lora-like" and c["full"].verdict.label == "full-ft-like"
    df = c.to_dataframe()
    assert list(df.verdict) == ["lora-like", "full-ft-like"]
    back = intruder.load_report(c.save(tmp_path / "c.json"))
    assert isinstance(back, intruder.TrackResult) and back.verdicts == c.verdicts
    _validate(json.loads((tmp_path / "c.json").read_text()))
    t = intruder.track(BASE, [os.path.join(m, f"continual_{i}") for i in (1, 2, 3)], **FAST)
    assert len(t) == 3 and t.to_dataframe()["count@0.5"].tolist() == [
        e["intruders"] for e in t.summary]
    assert t.to_html(tmp_path / "t.html") > 0


# ------------------------------------------------------------------------- inputs and errors


@pytest.mark.parametrize("bad, msg", [
    (42, "base: expected a path, a hub ID, a {name: tensor} state dict, a torch.nn.Module or a "
         "PEFT model; got int"),
    ({"w": "not a tensor"}, "state dict: 'w' is a str, not a torch.Tensor"),
    ({}, "state dict: the state dict is empty"),
])
def test_unsupported_inputs_are_one_line_errors(bad, msg):
    with pytest.raises(intruder.InputError) as info:
        intruder.scan(bad, BASE, **FAST)
    assert str(info.value) == msg
    assert isinstance(info.value, TypeError) and isinstance(info.value, intruder.IntruderError)


def test_option_errors_name_the_option():
    with pytest.raises(intruder.InputError, match="top_k must be a whole number"):
        intruder.scan(BASE, BASE, top_k="10", **FAST)
    with pytest.raises(intruder.IntruderError, match="--epsilon values must lie in"):
        intruder.scan(BASE, BASE, epsilon=1.5, **FAST)
    with pytest.raises(intruder.InputError, match="epsilon must be a number"):
        intruder.scan(BASE, BASE, epsilon=object(), **FAST)
    with pytest.raises(intruder.InputError, match="alpha must be a finite number"):
        intruder.rescale({}, os.path.join(ROOT, "reports", "demo", "lora_r8-scan.json"),
                         float("nan"))


def test_public_names_and_shadowing():
    import importlib

    for mod in ("intruder.scan", "intruder.track", "intruder.evaluate", "intruder.evaluate.wikitext"):
        importlib.import_module(mod)
    assert callable(intruder.scan) and callable(intruder.track) and callable(intruder.evaluate)
    assert intruder.scan.__module__ == "intruder.api"
    with pytest.raises(intruder.InputError, match="expected the path of a JSON report"):
        intruder.load_report(42)
    for name in intruder.__all__:
        assert getattr(intruder, name) is not None, name
    assert sorted(intruder.__all__) == sorted(set(intruder.__all__))


def test_public_api_doctests(monkeypatch):
    import doctest
    import importlib

    api = importlib.import_module("intruder.api")
    monkeypatch.chdir(ROOT)  # the examples name the bundled demo by relative path
    res = doctest.testmod(api, optionflags=doctest.ELLIPSIS, extraglobs={"intruder": intruder})
    assert res.failed == 0 and res.attempted >= 8


# ---------------------------------------------------------------------- evaluation contract


def _lm_eval_wikitext(tmp_path, pages, **hflm_kwargs):
    """lm-eval's own wikitext task on `pages` (a local JSON copy of the articles; offline)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    packaged = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "wikitext", "wikitext.yaml")
    (tasks / "wikitext_local.yaml").write_text(
        f"include: {packaged}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    hflm = HFLM(device="cpu", batch_size=8, **hflm_kwargs)
    out = simple_evaluate(model=hflm, tasks=["wikitext_local"], num_fewshot=0, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=False, verbosity="ERROR")
    return out["results"]["wikitext_local"]


def test_wikitext_contract_under_both_bos_settings(tmp_path, shared_data, monkeypatch):
    """Our `wikitext` equals lm-eval 0.4.13 run with add_bos_token=False; with lm-eval's default
    the demo tokenizer (which adds BOS) has every document scored after [BOS, BOS], which gives
    another number. Both are measured here on the demo base, first 2 test articles."""
    from importlib.metadata import version

    from intruder.evaluate.data import load_wikitext

    assert version("lm_eval") == "0.4.13"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wiki = os.path.join(shared_data, "wikitext-2-raw", "wiki.test.raw")
    pages = [d.text for d in load_wikitext(wiki).documents[:2]]
    ours = {x.metric: x for x in intruder.evaluate(BASE, f"wikitext:{wiki}", limit=2,
                                                   device="cpu", dtype="float32")}
    no_bos = _lm_eval_wikitext(tmp_path, pages, pretrained=BASE, dtype="float32",
                               add_bos_token=False)
    default = _lm_eval_wikitext(tmp_path, pages, pretrained=BASE, dtype="float32")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric].value == pytest.approx(no_bos[f"{metric},none"], rel=1e-6), metric
    w = ours["word_perplexity"]
    assert "lm-eval 0.4.13" in w.protocol and "add_bos_token=False" in w.protocol
    # lm-eval's default (add_bos_token unset: the tokenizer's own BOS is kept) differs
    d = default["word_perplexity,none"]
    assert abs(d / w.value - 1) > 1e-3
    print(f"demo base, 2 articles: word perplexity {w.value:.2f} (ours = lm-eval 0.4.13 "
          f"add_bos_token=False), {d:.2f} (lm-eval 0.4.13 default)")


def test_notebooks_use_only_public_names():
    """The notebooks import `intruder` alone and use only names in intruder.__all__."""
    import nbformat

    for nb_name in ("01_walkthrough.ipynb", "02_continual_learning.ipynb"):
        nb = nbformat.read(os.path.join(ROOT, "notebooks", nb_name), as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "import intruder\n" in code
        assert not re.search(r"from intruder\b|import intruder\.", code), nb_name
        used = set(re.findall(r"\bintruder\.([A-Za-z_]\w*)", code))
        assert used and used <= set(intruder.__all__), used - set(intruder.__all__)


def test_hub_ids_take_the_checkpoint_layer(tmp_path, monkeypatch, peft_model):
    """A hub ID resolves where paths are opened (intruder.io.hub), so the API takes it as BASE
    next to an in-memory PEFT model: the same numbers as the paths."""
    from test_hub import _files, add_to_cache

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(str(cache), "org/base", "1" * 40, _files(BASE))
    r = intruder.scan("org/base", peft_model, **FAST)
    assert (r.base.repo_id, r.base.commit) == ("org/base", "1" * 40)
    assert _layers_by_name(r) == _layers_by_name(intruder.scan(BASE, ADAPTER, **FAST))
