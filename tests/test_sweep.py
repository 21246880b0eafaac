"""The in-memory alpha sweep: the in-place rescaler against the written checkpoints, bit-exact
restoration, sweep results against file-based evaluation, lm-eval tasks, several workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from intruder.errors import ReportError
from intruder.inplace import InPlaceRescaler
from intruder.intervene import scale_checkpoint
from intruder.scan import run_scan
from intruder.types import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "fixtures", "demo", "models")


@pytest.fixture(scope="module")
def demo_pair():
    base, tuned = os.path.join(DEMO, "base"), os.path.join(DEMO, "lora_r8")
    if not os.path.isfile(os.path.join(tuned, "model.safetensors")):
        pytest.skip("demo models not built")
    report = run_scan(base, tuned, ScanConfig(device="cpu", cache_dir=None))
    assert sum(len(l.intruders) for l in report.layers) > 10
    return base, tuned, report


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _storage(report):
    return {l.name: torch.float16 for l in report.layers}


@pytest.mark.parametrize("chunk", [None, 1000])
def test_inplace_equals_written_checkpoint_and_restores(demo_pair, tmp_path, monkeypatch, chunk):
    """Every weight at alpha equals the written alpha checkpoint's (float16 stored, loaded as
    float32); back at alpha = 1 every parameter is bit for bit what was loaded."""
    if chunk:  # row blocks of a few rows: the path large matrices take
        monkeypatch.setattr("intruder.inplace.CHUNK_ELEMENTS", chunk)
    base, tuned, report = demo_pair
    alphas = [0.0, 0.5, 1.7]
    outs = [str(tmp_path / f"a{i}") for i in range(len(alphas))]
    written = scale_checkpoint(report, alphas, outs, base=base, tuned=tuned, device="cpu")
    model = _load(tuned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = InPlaceRescaler(model, report, storage_dtypes=_storage(report))
    assert r.n_intruders == written[0].n_intruders and len(r.targets) == len(written[0].layers)
    for a, out, w in zip(alphas, outs, written):
        changes = r.set_alpha(a)
        ref = _load(out).state_dict()
        for k, v in model.state_dict().items():
            # one float16 unit in the last place at most (float64 row blocks may round apart)
            np.testing.assert_allclose(v.numpy(), ref[k].numpy(), rtol=2 ** -10, atol=0)
        got = {c.name: c.rel_change for c in changes}
        for lc in w.layers:
            assert got[lc.name] == pytest.approx(lc.rel_change, rel=1e-6, abs=1e-12)
    r.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert v.dtype == before[k].dtype


def test_inplace_refuses_another_model(demo_pair):
    base, _, report = demo_pair
    with pytest.raises(ReportError, match="singular values recomputed"):
        InPlaceRescaler(_load(base), report)


def test_in_memory_and_written_rescaling_are_one_computation(demo_pair, tmp_path):
    """A {name: tensor} dict in the stored dtype, rescaled in place, equals the written alpha
    checkpoint bit for bit (the writer and the in-place rescaler run the same row blocks, so
    no rounding can differ); keep="none" keeps no copy and sets one alpha only."""
    from safetensors.torch import load_file

    from intruder.errors import IntruderError
    from intruder.inplace import rescaled_copy

    base, tuned, report = demo_pair
    out = str(tmp_path / "a")
    scale_checkpoint(report, [0.25], [out], base=base, tuned=tuned, device="cpu")
    written = load_file(os.path.join(out, "model.safetensors"))
    stored = load_file(os.path.join(tuned, "model.safetensors"))
    sd = {k: v.clone() for k, v in stored.items()}
    r = InPlaceRescaler(sd, report, keep="none")
    assert r.kept_bytes == 0
    r.set_alpha(0.25)
    assert set(sd) == set(written)
    for k, v in written.items():
        assert torch.equal(sd[k], v), k
    with pytest.raises(IntruderError, match="one alpha only"):
        r.set_alpha(0.5)
    copy = rescaled_copy(stored, report, 0.25)  # intruder.rescale's path: the input untouched
    assert all(torch.equal(copy[k], v) for k, v in written.items())
    again = load_file(os.path.join(tuned, "model.safetensors"))
    assert all(torch.equal(v, again[k]) for k, v in stored.items())


# ------------------------------------------------------------------------------- the sweep

WIKI = os.path.join(os.environ.get("INTRUDER_DATA_DIR") or os.path.join(os.path.dirname(ROOT),
                                                                        "shared", "data"),
                    "wikitext-2-raw", "wiki.test.raw")
WINO = os.path.join(os.path.dirname(WIKI), "..", "winogrande", "test.json")
needs_data = pytest.mark.skipif(not (os.path.isfile(WIKI) and os.path.isfile(WINO)),
                                reason="shared evaluation data not found")


def _by_label(sweep):
    return {row.label: {(r.evaluator, r.metric): r.value for r in row.results}
            for row in sweep.rows}


@pytest.fixture(scope="module")
def demo_sweep(demo_pair, tmp_path_factory):
    """One in-memory sweep on the demo LoRA r=8 model, every alpha also saved."""
    import json

    from intruder.evaluate.data import load_wikitext
    from intruder.scale_sweep import run_sweep

    base, tuned, report = demo_pair
    out = tmp_path_factory.mktemp("sweep")
    data = tmp_path_factory.mktemp("data")
    corpus = load_wikitext(WIKI)  # the first article; 40 WinoGrande items
    (data / "wiki.test.raw").write_text("\n".join(corpus.lines[:corpus.documents[0].stop]))
    (data / "winogrande.json").write_text(json.dumps(json.load(open(WINO))[:40]))
    evals = [f"wikitext:{data / 'wiki.test.raw'}", f"task:{data / 'winogrande.json'}"]
    sweep = run_sweep(report, [0.0, 0.5, 1.0], str(out), base=base, tuned=tuned, evals=evals,
                      device="cpu", save_alphas=[0.0, 0.5])
    return sweep, evals


@needs_data
def test_in_memory_sweep_equals_written_checkpoints(demo_sweep, demo_pair):
    """Each alpha evaluated in memory gives the numbers of its written checkpoint, loaded and
    evaluated from disk: WikiText word perplexity within 1e-6 relative, task metrics equal."""
    from intruder.evaluate import evaluate_model

    base, _, _ = demo_pair
    demo_sweep, evals = demo_sweep
    rows = _by_label(demo_sweep)
    assert list(rows) == ["base", "tuned", "alpha=0", "alpha=0.5", "alpha=1"]
    assert rows["alpha=1"] == rows["tuned"]
    assert len({rows[k][("wikitext", "word_perplexity")] for k in rows}) == 4
    for row in demo_sweep.rows:
        if row.role != "scaled" or row.alpha == 1.0:  # alpha 1: the tuned row, same numbers
            continue
        assert os.path.exists(row.path)
        disk = {(r.evaluator, r.metric): r.value for r in evaluate_model(
            row.path, evals, model_config=base, device="cpu", progress=False)}
        mem = rows[row.label]
        assert set(disk) == set(mem)
        for key, v in disk.items():
            if key[0] == "wikitext":
                assert mem[key] == pytest.approx(v, rel=1e-6), (row.label, key)
            else:
                assert mem[key] == v, (row.label, key)
    timing = demo_sweep.timing
    assert [j["job"] for j in timing["jobs"]] == ["base", "alpha=0", "alpha=0.5", "alpha=1"]
    assert all(j["eval_seconds"] > 0 for j in timing["jobs"])


@needs_data
def test_results_file_declares_format_and_one_axis_choice(demo_sweep):
    """The PNG (writer) and the HTML (reader) choose the same two metrics."""
    import json

    from intruder.report.scale_results import FORMAT, load_scale_results
    from intruder.scale_sweep import plot_choice

    demo_sweep, _ = demo_sweep
    doc = json.load(open(demo_sweep.files["json"]))
    assert doc["format"] == FORMAT and doc["timing"]["jobs"]
    table = load_scale_results(demo_sweep.files["json"])
    pre, task = plot_choice(demo_sweep.rows)
    assert pre == ("wikitext", "word_perplexity") and task == ("task:winogrande", "accuracy")
    assert (table.x_metric, table.y_metric) == ("/".join(pre), "/".join(task))


def _text_spec(demo_pair, tmp_path, text):
    """A SweepSpec for the demo pair evaluated on one held-out text file."""
    from intruder.scale_sweep import _storage_dtypes
    from intruder.sweep_exec import SweepSpec

    base, tuned, report = demo_pair
    p = tmp_path / "t.txt"
    p.write_text(text)
    return SweepSpec(report=report, base_path=base, model_path=tuned, evals=(f"task:{p}",),
                     storage_dtypes=_storage_dtypes(report, tuned, None))


def test_worker_restores_every_weight_after_a_sweep(demo_pair, tmp_path):
    """After a sweep over several alphas the model's every tensor is bit for bit the loaded one."""
    from intruder.evaluate import load_model
    from intruder.sweep_exec import Job, Worker

    tuned = demo_pair[1]
    spec = _text_spec(demo_pair, tmp_path, "A short held-out text for the tiny model.\n" * 4)
    w = Worker(spec, "cpu")
    for a in (0.0, 0.25, 1.0, 2.0, 0.5):
        w.run(Job("alpha", a))
    before = load_model(tuned, device="cpu", progress=False).model.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in w.lm.model.state_dict().items())
    stats = w.close()
    assert stats.kept_bytes > 0
    for k, v in w.lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_two_worker_processes_match_one(demo_pair, tmp_path):
    """Alphas scheduled over 2 CPU worker processes give the one-worker results."""
    from intruder.sweep_exec import assign, make_jobs, run_jobs

    spec = _text_spec(demo_pair, tmp_path,
                      "Held-out text: the tiny model scores every token of it.\n" * 6)
    jobs = make_jobs([0.0, 0.5, 1.0])
    assert [[j.alpha for j in part] for part in assign(jobs, 2)] == [[None, 0.5], [0.0, 1.0]]
    one = run_jobs(spec, jobs, ["cpu"])
    two = run_jobs(spec, jobs, ["cpu", "cpu"])
    assert [r.job for r in two.results] == jobs and {r.worker for r in two.results} == {0, 1}
    for a, b in zip(one.results, two.results):
        for x, y in zip(a.results, b.results):
            assert (x.evaluator, x.metric, x.n_units) == (y.evaluator, y.metric, y.n_units)
            assert y.value == pytest.approx(x.value, rel=1e-9)
        assert [c.rel_change for c in a.changes] == pytest.approx([c.rel_change for c in b.changes])


def test_missing_data_fails_before_any_rescale(demo_pair, tmp_path):
    """A missing WikiText file or a broken task file is found before anything is written."""
    from intruder.errors import EvalError
    from intruder.scale_sweep import run_sweep

    base, tuned, report = demo_pair
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "no options here", "answer": "option1"}]')
    for evals in ([f"wikitext:{tmp_path / 'nowhere.raw'}"], [f"task:{bad}"]):
        out = tmp_path / "out"
        with pytest.raises(EvalError):
            run_sweep(report, [0.0, 0.5], str(out), base=base, tuned=tuned, evals=evals,
                      device="cpu", save_alphas=[0.0])
        assert not out.exists() or not os.listdir(out)


SIQA = os.path.join(os.path.dirname(WIKI), "..", "social_i_qa", "test.json")


@pytest.mark.skipif(not os.path.isfile(SIQA), reason="shared evaluation data not found")
def test_lm_eval_custom_task_equals_lm_eval_on_written_checkpoint(demo_pair, tmp_path,
                                                                  monkeypatch):
    """`--eval lm-eval:TASK` with a user's task YAML over a local JSON file: the in-memory
    sweep's numbers are lm-eval's own, run directly on the written alpha checkpoint."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")
    import json
    from pathlib import Path

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from intruder.evaluate.lmeval import DEFAULT_BATCH, results_from_lm_eval
    from intruder.evaluate.task import load_choice_items
    from intruder.scale_sweep import run_sweep

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    items = load_choice_items(Path(SIQA), 24)
    data = tmp_path / "tasks" / "siqa_local.json"
    data.parent.mkdir()
    data.write_text(json.dumps([{"question": it.stem, "choices": list(it.options),
                                 "label": it.label} for it in items]))
    (data.parent / "siqa_local.yaml").write_text(
        "task: siqa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    base, tuned, report = demo_pair
    out = tmp_path / "out"
    sweep = run_sweep(report, [0.0, 1.0], str(out), base=base, tuned=tuned,
                      evals=["lm-eval:siqa_local"], lm_eval_include=[str(data.parent)],
                      device="cpu", save_alphas=[0.0])
    rows = {row.label: row for row in sweep.rows}
    mem = {r.metric: r for r in rows["alpha=0"].results}
    assert set(mem) == {"acc", "acc_norm"} and all(r.n_units == 24 for r in mem.values())
    assert mem["acc"].evaluator == "lm-eval:siqa_local" and "0-shot" in mem["acc"].protocol
    # lm-eval by itself on the checkpoint the sweep wrote for alpha = 0
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=rows["alpha=0"].path, dtype="float32", device="cpu",
                   batch_size=DEFAULT_BATCH),
        tasks=["siqa_local"], task_manager=TaskManager(include_path=str(data.parent)),
        log_samples=False)
    ref = {r.metric: r.value for r in results_from_lm_eval(direct, ["siqa_local"], "")}
    assert ref == {m: r.value for m, r in mem.items()}
    assert sweep.files["plot"].endswith(".png")


def test_lm_eval_unknown_task_fails_before_work(demo_pair, tmp_path):
    pytest.importorskip("lm_eval")
    from intruder.errors import EvalError
    from intruder.scale_sweep import run_sweep

    base, tuned, report = demo_pair
    with pytest.raises(EvalError, match="no task 'hellaswagg'.*hellaswag"):
        run_sweep(report, [0.0], str(tmp_path / "o"), base=base, tuned=tuned,
                  evals=["lm-eval:hellaswagg"], device="cpu")
    assert not (tmp_path / "o").exists()


def test_adapter_sweep_in_memory_equals_written(tmp_path):
    """A PEFT adapter as TUNED: the merged model is written once (a temporary, removed after),
    each alpha is evaluated in memory, and matches its written checkpoint."""
    from intruder.evaluate import evaluate_model
    from intruder.scale_sweep import run_sweep

    base = os.path.join(DEMO, "base")
    adapter = os.path.join(ROOT, "fixtures", "demo", "adapters", "lora_r8")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        pytest.skip("demo adapters not built")
    report = run_scan(base, adapter, ScanConfig(device="cpu", cache_dir=None))
    text = tmp_path / "held.txt"
    text.write_text("The model reads this held-out text and scores each token of it.\n" * 6)
    out = tmp_path / "out"
    sweep = run_sweep(report, [0.0], str(out), base=base, tuned=adapter, evals=[f"task:{text}"],
                      device="cpu", save_alphas=[0.0])
    assert sorted(os.listdir(out)) == ["alpha-0", "scale-results.csv", "scale-results.json",
                                       "scale-tradeoff.png"]  # the merged temporary is gone
    rows = {r.label: {x.metric: x.value for x in r.results} for r in sweep.rows}
    assert list(rows) == ["base", "tuned", "alpha=0"]
    disk = {x.metric: x.value for x in evaluate_model(str(out / "alpha-0"), [f"task:{text}"],
                                                      device="cpu", progress=False)}
    assert rows["alpha=0"]["token_loss"] == pytest.approx(disk["token_loss"], rel=1e-6)
    assert rows["alpha=0"]["next_token_accuracy"] == disk["next_token_accuracy"]
    assert rows["tuned"]["token_loss"] != rows["alpha=0"]["token_loss"]
