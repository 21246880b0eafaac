"""The HTML audit, its figures, the pandas views and `intruder report`: exact content, escaping,
self-containment, and the similarity blocks against a float64 LAPACK computation."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import synthetic
from click.testing import CliRunner

import intruder.scale_sweep as ss
from intruder.cli import cli
from intruder.errors import OutputError, ReportError
from intruder.report import frame, plots, views
from intruder.report.html import escape, render_html, write_html
from intruder.report.scale_results import load_scale_results, parse_scale_results
from intruder.report.schema import save_report
from intruder.report.similarity import recompute_similarity
from intruder.report.verdict import decide
from intruder.scan import run_scan
from intruder.types import CheckpointInfo, EvalResult, Intruder, LayerResult, ScanConfig, ScanReport

HOSTILE = "x<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def planted(synth):
    return run_scan(synth["base_file"], synth["tuned_file"], ScanConfig(epsilons=(0.5, 0.3, 0.9)))


@pytest.fixture(scope="module")
def dense(synth):
    return run_scan(synth["base_file"], synth["dense_file"], ScanConfig(epsilons=(0.5, 0.9)))


def _layer(name, max_cos, eps=0.5, status="scanned"):
    intr = tuple(Intruder(index=j, sigma=10.0 - j, max_cos=c, base_index=j + 50)
                 for j, c in enumerate(max_cos) if c < eps)
    return LayerResult(name=name, shape=(64, 64), dtype="F32", status=status,
                       sigma_tuned=tuple(10.0 - j for j in range(len(max_cos))),
                       sigma_base=tuple(10.0 - j for j in range(len(max_cos) + 5)),
                       max_cos=tuple(max_cos), base_index=tuple(range(len(max_cos))),
                       intruders=intr, counts_by_epsilon=((eps, len(intr)),))


def _report(layers, warnings=()):
    ck = CheckpointInfo(path="m", kind="safetensors", n_tensors=1, bytes=1, dtypes=("F32",),
                        fingerprint="0")
    return ScanReport(base=ck, tuned=ck, config=ScanConfig(), layers=tuple(layers),
                      warnings=tuple(warnings))


# ---------------------------------------------------------------------------------------- views


@pytest.mark.parametrize("name,parts", [
    ("model.layers.12.mlp.up_proj.weight", ("model.layers", 12, "mlp.up_proj")),
    ("transformer.h.3.attn.c_attn.weight", ("transformer.h", 3, "attn.c_attn")),
    ("bert.encoder.layer.5.attention.self.query.weight", ("bert.encoder.layer", 5, "attention.self.query")),
    ("encoder.block.2.layer.1.DenseReluDense.wi.weight", ("encoder.block", 2, "layer.*.DenseReluDense.wi")),
    ("model.layers.3.mlp.experts.7.up_proj.weight", ("model.layers", 3, "mlp.experts.*.up_proj")),
    ("lm_head.weight", ("", None, "lm_head")),
    ("h.0.weight", ("h", 0, "(block)")),
    ("model.layers.\u0663.q.weight", ("", None, "model.layers.\u0663.q")),  # Arabic-Indic digit
    (".weight", ("", None, ".weight")),
])
def test_split_name_any_architecture(name, parts):
    p = views.split_name(name)
    assert (p.stack, p.layer, p.module) == parts


def test_grid_counts_match_planted_truth(planted, synth):
    g = views.layer_module_grid(planted)
    assert g.rows == ("0", "1")
    assert set(g.cols) == {m for m in synthetic.LLAMA_MODULES}
    cell = {(r, c): g.counts[i][j] for i, r in enumerate(g.rows) for j, c in enumerate(g.cols)}
    expected = {(n.split(".")[2], ".".join(n.split(".")[3:5])): len(r)
                for n, r in synth["truth"].items()}
    assert {k: v for k, v in cell.items() if v} == expected
    mins = {(r, c): g.min_cos[i][j] for i, r in enumerate(g.rows) for j, c in enumerate(g.cols)}
    scanned = {(l.name.split(".")[2], ".".join(l.name.split(".")[3:5])): min(l.max_cos)
               for l in planted.layers if l.status == "scanned"}
    assert {k: v for k, v in mins.items() if v is not None} == scanned  # unchanged: no value


def test_multi_stack_rows_are_kept_apart():
    rep = _report([_layer("encoder.block.1.q.weight", [0.2, 0.9]),
                   _layer("decoder.block.1.q.weight", [0.9, 0.9]),
                   _layer("lm_head.weight", [0.1, 0.9])])
    g = views.layer_module_grid(rep)
    assert g.rows == ("encoder.block 1", "decoder.block 1", "other")
    assert g.cols == ("q", "lm_head")
    assert g.counts == ((1, None), (0, None), (None, 1))


def test_sweep_agrees_with_scan_counts_and_numpy(planted, dense):
    for rep in (planted, dense):
        sw = {e: n for e, n, _ in views.sweep(rep)}
        stored = {}
        for l in rep.layers:
            for e, n in l.counts_by_epsilon:
                stored[e] = stored.get(e, 0) + n
        for e, n in stored.items():
            if e in sw:
                assert sw[e] == n
        allc = np.array([c for l in rep.layers for c in l.max_cos])
        assert [n for _, n, _ in views.sweep(rep)] == [int((allc < e).sum()) for e in sw]
    assert {e: n for e, n, _ in views.sweep(planted)}[0.5] == 4


def test_verdict_planted(planted):
    v = decide(planted)
    assert v.tone == "intruders" and v.intruders == 4
    assert v.wording.endswith(": 4 intruders at epsilon 0.5 in 3 of 3 changed matrices, "
                              "spread over layers 0-1, mostly mlp.up_proj (2 of 4)."), v.wording
    assert any("11 of 14 matrices are bit-identical" in d for d in v.evidence)


def test_verdict_dense_names_distance_to_first_intruder(dense):
    v = decide(dense)
    low = min(c for l in dense.layers for c in l.max_cos)
    assert v.tone == "none" and v.label == "full-ft-like" and v.intruders == 0
    assert v.wording.startswith("Full-fine-tuning-like update (dense in 14 of 14 changed "
                                "matrices), no intruders at epsilon 0.5: margin "), v.wording
    assert f"{low - 0.5:.3f} (lowest max|cos| {low:.3f} in " in v.wording


def test_verdict_concentration_on_32_blocks():
    layers = []
    for i in range(32):
        for mod in ("self_attn.q_proj", "mlp.up_proj"):
            flagged = mod == "mlp.up_proj" and i >= 20
            layers.append(_layer(f"model.layers.{i}.{mod}.weight",
                                 [0.2, 0.3, 0.9] if flagged else [0.95, 0.97, 0.99]))
    layers.append(_layer("model.layers.2.self_attn.q_proj.weight", [0.1, 0.99]))
    v = decide(_report(layers))
    assert v.wording == ("LoRA-like by intruder count: 25 intruders at epsilon 0.5 in 13 of 65 changed matrices, "
                          "concentrated in layers 20-31, mostly mlp.up_proj (24 of 25).")
    c = views.concentration(_report(layers))
    assert (c.first, c.last, c.inside, c.total, c.span) == (20, 31, 24, 25, 32)


def test_verdict_unrelated_and_unchanged():
    rep = _report([_layer("a.0.w.weight", [0.1])], warnings=["TUNED does not look derived from BASE: x"])
    assert decide(rep).label == "unrelated" and decide(rep).tone == "warn"
    rep = _report([LayerResult(name="a.0.w.weight", shape=(2, 2), dtype="F32", status="unchanged")])
    assert decide(rep).wording.startswith("Unchanged: all 1 matrices")


def test_layer_choices(planted, dense):
    assert [l.name for l in views.most_affected(planted, 2)] == [
        "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert views.clean_layer(planted) is None  # every changed matrix has an intruder
    best = max((l for l in dense.layers), key=lambda l: min(l.max_cos))
    assert views.clean_layer(dense).name == best.name


# ----------------------------------------------------------------------------------- similarity


def test_similarity_blocks_match_lapack(planted, synth):
    names = [l.name for l in views.most_affected(planted)]
    blocks = recompute_similarity(planted, names)
    from safetensors.numpy import load_file

    b, t = load_file(synth["base_file"]), load_file(synth["tuned_file"])
    for name in names:
        blk = blocks[name]
        cos = np.array(blk.cos)  # (k, N)
        assert cos.shape == (10, 20)
        u0 = np.linalg.svd(b[name].astype(np.float64), full_matrices=False)[0]
        ut = np.linalg.svd(t[name].astype(np.float64), full_matrices=False)[0]
        ref = np.abs(ut[:, :10].T @ u0[:, :20])  # (k, N)
        assert np.max(np.abs(cos - ref)) < 1e-8
        assert blk.intruders == tuple(synth["truth"][name])
        assert all(cos[j].max() < 0.5 for j in blk.intruders)


def test_similarity_refuses_changed_weights(planted, synth, tmp_path):
    d = tmp_path / "moved"
    d.mkdir()
    shutil.copy(synth["base_file"], d / "base.safetensors")
    base, tuned, _ = synthetic.llama_pair(plants=synthetic.DEFAULT_PLANTS, seed=0)
    name = "model.layers.1.mlp.up_proj.weight"
    tuned[name] = tuned[name] * 1.5  # same names, shapes and sizes: other content sha256
    synthetic.write_safetensors(str(d / "tuned.safetensors"), tuned)
    with pytest.raises(ReportError, match="changed since the scan \\(content sha256"):
        recompute_similarity(planted, [name], base_path=str(d / "base.safetensors"),
                             tuned_path=str(d / "tuned.safetensors"))
    # without the identity check, the recomputed numbers still give the change away
    with pytest.raises(ReportError, match="differ from the scanned ones"):
        recompute_similarity(planted, [name], base_path=str(d / "base.safetensors"),
                             tuned_path=str(d / "tuned.safetensors"), check_fingerprint=False)
    page, info = render_html(planted, base_path=str(d / "base.safetensors"),
                             tuned_path=str(d / "tuned.safetensors"), command="t")
    assert info.similarity.startswith("not available:") and "changed" in info.similarity
    with pytest.raises(ReportError):
        render_html(planted, similarity=True, base_path=str(d / "nope.safetensors"))


# ---------------------------------------------------------------------------------------- plots


def test_plots_draw_the_reported_numbers(planted, dense):
    g = views.layer_module_grid(planted)
    fig = plots.layer_module_heatmap(planted, "count")
    arr = fig.axes[0].images[0].get_array()
    expect = np.array([[np.nan if m is None else c for c, m in zip(cr, mr)]
                       for cr, mr in zip(g.counts, g.min_cos)], dtype=float)
    np.testing.assert_array_equal(np.ma.filled(arr.astype(float), np.nan), expect)
    fig = plots.epsilon_sweep({"planted": planted, "dense": dense})
    lines = fig.axes[0].get_lines()
    assert [list(l.get_ydata()) for l in lines] == [[n for _, n, _ in views.sweep(r)]
                                                     for r in (planted, dense)]
    fig = plots.max_cos_histogram(planted)
    assert sum(p.get_height() for p in fig.axes[0].patches) == len(views.all_max_cos(planted))
    fig = plots.spectra(planted)
    marks = [l for ax in fig.axes for l in ax.get_lines() if l.get_marker() == "x"]
    assert len(marks) == 4
    assert plots.to_png(plots.module_bars(planted))[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_take_hostile_names_literally():
    names = ["model.layers.0.a$b.weight", "model.layers.1.$\\frac{1}$.weight",
             f"model.layers.2.x\\y_{{z}}^q{HOSTILE}.weight"]
    rep = _report([_layer(n, [0.2, 0.9]) for n in names])
    for fig in (plots.layer_module_heatmap(rep), plots.module_bars(rep), plots.spectra(rep),
                plots.max_cos_histogram({"a$b": rep}), plots.epsilon_sweep({"$x": rep}),
                plots.counts_bar(["$", "b"], [1, 2]), plots.sequence_counts({"$a": rep})):
        assert plots.to_png(fig)[:4] == b"\x89PNG"
    fig = plots.layer_module_heatmap(rep)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][0] == "a$b"


# ---------------------------------------------------------------------------------------- frame


def test_dataframes(planted):
    from intruder.report.frame import to_dataframe

    df = to_dataframe(planted)
    assert list(df.name) == [l.name for l in planted.layers]
    assert int(df.intruders.sum()) == 4
    assert df.loc[df.name == "model.layers.1.mlp.up_proj.weight", "intruder_ranks"].item() == (2, 5)
    assert int(df["count@0.9"].sum()) == 4 and str(df.layer.dtype) == "Int64"
    vec = frame.vectors_dataframe(planted)
    assert len(vec) == 30 and int(vec.intruder.sum()) == 4
    assert [int((vec.max_cos < e).sum()) for e, _, _ in views.sweep(planted)] == \
        [n for _, n, _ in views.sweep(planted)]
    intr = frame.intruders_dataframe(planted)
    assert sorted(zip(intr.name, intr["rank"])) == sorted(
        (n, r) for n, rs in {l.name: [i.index for i in l.intruders] for l in planted.layers}.items()
        for r in rs)


# ----------------------------------------------------------------------------------------- HTML


def _hostile_report(tmp_path):
    d = tmp_path / "a<script>alert(2)</script" / "b"
    d.mkdir(parents=True)
    base, tuned, _ = synthetic.llama_pair(layers=1, plants={
        "model.layers.0.mlp.up_proj.weight": [1]}, seed=3)
    bad = f"model.layers.0.mlp.{HOSTILE}.weight"
    for sd in (base, tuned):
        sd[bad] = sd.pop("model.layers.0.mlp.up_proj.weight")
    synthetic.write_safetensors(str(d / "base.safetensors"), base)
    synthetic.write_safetensors(str(d / "tuned.safetensors"), tuned)
    return run_scan(str(d / "base.safetensors"), str(d / "tuned.safetensors")), d


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def check_self_contained(page: str) -> list:
    """No external resource of any kind; exactly one script, inline. Returns the parsed tags."""
    p = _Tags()
    p.feed(page)
    tags = p.tags
    assert [a for t, a in tags if t == "script"] == [{}]
    assert not [t for t, _ in tags if t in ("link", "iframe", "object", "embed", "base", "form")]
    for t, attrs in tags:
        for k, v in attrs.items():
            assert not k.startswith("on"), (t, k)  # no inline event handlers
            if k in ("src", "href", "action", "srcset", "poster", "data"):
                assert v.startswith("data:image/png;base64,") or v.startswith("#"), (t, k, v)
    assert "@import" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page
    return tags


def test_html_escapes_checkpoint_strings(tmp_path):
    rep, d = _hostile_report(tmp_path)
    assert any(HOSTILE in l.name and l.intruders for l in rep.layers)
    out = tmp_path / "audit.html"
    info = write_html(rep, str(out), command="intruder report <script>x</script>")
    page = out.read_text(encoding="utf-8")
    assert "<img src=x" not in page and "<script>alert" not in page and "<script>x" not in page
    assert escape(HOSTILE) in page and "a&lt;script&gt;alert(2)&lt;/script" in page
    tags = check_self_contained(page)
    assert not [a for t, a in tags if t == "img" and a.get("src") == "x"]
    assert info.similarity.startswith("recomputed")
    assert info.figures == page.count("<img ") >= 7


def test_html_content_planted(planted, tmp_path):
    scale = _sweep_doc([("base", None, None, 20.0, 0.4), ("tuned", 1.0, None, 30.0, 0.6),
                        ("scaled", 0.5, 4, 24.0, 0.58)], evaluators=("wikitext", "task:siqa"))
    extra = {"Margin view": "<p id='m'>margin</p>"}
    page, info = render_html(planted, extra, scale_results=scale, command="cmd")
    check_self_contained(page)
    for anchor in ("identity", "config", "grid", "margin", "similarity", "maxcos", "spectra",
                   "tradeoff", "intruders", "layers", "provenance", "extra-0"):
        assert f'<section id="{anchor}">' in page
    assert escape(decide(planted).wording) in page
    assert planted.base.fingerprint in page and planted.tuned.fingerprint in page
    assert "wikitext/word_perplexity" in page and "<p id='m'>margin</p>" in page
    rows = re.findall(r'<tr data-name="([^"]*)" data-status="(\w+)" data-flagged="(\d)"', page)
    assert [r[0] for r in rows] == [l.name for l in planted.layers]
    assert sum(r[2] == "1" for r in rows) == 3
    # 2 grids, bars, similarity, histogram, sweep, spectra, trade-off (+ the margin view's)
    assert info.figures == page.count("<img ") >= 8
    # CSP hashes must match the inline style and script exactly (else the browser blocks them)
    import base64
    import hashlib

    for tag, kind in (("style", "style-src"), ("script", "script-src")):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
        h = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{kind} 'sha256-{h}'" in page


@pytest.mark.parametrize("case", ["unchanged", "nonfinite-and-other", "no-intruders"])
def test_html_edge_reports(case):
    if case == "unchanged":
        layers = [LayerResult(name="m.layers.0.q.weight", shape=(4, 4), dtype="F16", status="unchanged")]
    elif case == "nonfinite-and-other":
        layers = [LayerResult(name="m.layers.0.q.weight", shape=(4, 4), dtype="F16", status="nonfinite"),
                  _layer("lm_head.weight", [0.3, 0.95])]
    else:
        layers = [_layer(f"m.layers.{i}.q.weight", [0.9, 0.99]) for i in range(3)]
    rep = _report(layers)
    page, info = render_html(rep, similarity=False, command="c")
    check_self_contained(page)
    assert escape(decide(rep).wording) in page
    assert info.figures == page.count("<img ")
    assert info.figures == (0 if case == "unchanged" else 6)  # no similarity: 2 grids, bars,
    # histogram, sweep, spectra


def test_write_html_is_atomic(planted, tmp_path):
    with pytest.raises(OutputError):
        write_html(planted, str(tmp_path / "missing-dir" / "a.html"), similarity=False)
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------------------- scale results


def _sweep_doc(rows, evaluators=("wikitext", "task:s"), n_units=10):
    """What intruder.scale_sweep writes for model rows (role, alpha, n_intruders, perplexity,
    accuracy), read back as JSON."""
    def ev(evaluator, metric, v):
        return EvalResult(evaluator, metric, v, n_units, "items", "protocol text")

    models = tuple(ss.ModelRow(f"alpha={alpha:g}" if role == "scaled" else role, role, alpha, "p",
                               n_intruders=n_i, results=(ev(evaluators[0], "word_perplexity", ppl),
                                                         ev(evaluators[1], "accuracy", acc)))
                   for role, alpha, n_i, ppl, acc in rows)
    sweep = ss.Sweep(base="b", tuned="t", tuned_kind="file", out_dir=".",
                     alphas=tuple(a for r, a, *_ in rows if r == "scaled"), epsilon=0.5, top_k=10,
                     scaled=(), rows=models)
    return json.loads(json.dumps(ss.to_dict(sweep)))


def test_scale_results_from_scale_sweep_writer():
    """The reader reads what intruder.scale_sweep writes: roles, alphas, metrics, the axes."""
    doc = _sweep_doc([("base", None, None, 20.0, 0.3), ("tuned", 1.0, None, 30.0, 0.6),
                      ("scaled", 0.0, 4, 22.0, 0.5)])
    t = parse_scale_results(doc)
    assert [(p.role, p.alpha, p.get("wikitext/word_perplexity")) for p in t.points] == [
        ("base", None, 20.0), ("tuned", 1.0, 30.0), ("scaled", 0.0, 22.0)]
    assert [p.label for p in t.points] == ["base", "tuned (alpha = 1)", "alpha = 0"]
    assert (t.x_metric, t.y_metric) == ("wikitext/word_perplexity", "task:s/accuracy")
    assert t.points[2].intruders == 4 and t.epsilon == 0.5 and t.intervention.startswith("W")
    assert dict(t.protocols)["task:s/accuracy"] == "protocol text [items] (n = 10)"
    # a sweep without --eval: its rows, no metrics, no axes
    doc["models"] = [dict(m, results=[]) for m in doc["models"] if m["role"] == "scaled"]
    t = parse_scale_results(doc)
    assert [(p.label, p.intruders, p.metrics) for p in t.points] == [("alpha = 0", 4, ())]
    assert t.metrics == () and (t.x_metric, t.y_metric) == (None, None)


def _broken(doc, change):
    doc = json.loads(json.dumps(doc))
    change(doc)
    return doc


def _metric_mapping(doc):
    """The first row's metrics as a {evaluator: {metric: value}} mapping (a hand-made shape)."""
    row = doc["models"][0]
    del row["results"]
    row["metrics"] = {"wikitext": {"word_perplexity": 20.0}}


@pytest.mark.parametrize("case,message", [
    ("flat list", "not an intruder scale-results file (a JSON array, expected an object tagged "
                  "format 'intruder.scale-results/1')"),
    ("no tag", "not an intruder scale-results file (no format tag, expected "
               "'intruder.scale-results/1')"),
    ("other tag", "not an intruder scale-results file (format tag 'intruder.scale-results/2', "
                  "expected 'intruder.scale-results/1')"),
    ("rows elsewhere", "'models' must be a non-empty list of model rows"),
    ("metric mapping", "models[0]: missing 'results' (a row holds label, role, alpha, path, "
                       "n_intruders, n_matrices, max_rel_change, note, results)"),
    ("guessed role", "models[2]: role 'alpha' is not one of base, tuned, scaled"),
    ("scaled without alpha", "models[2]: alpha must be a number, got None"),
    ("short result", "models[1].results[0]: missing 'protocol' (a result holds evaluator, "
                     "metric, value, n_units, unit, protocol, extra)"),
    ("text value", "models[1].results[1]: 'value' must be a number or null, got '0.6'"),
    ("not JSON", "not valid JSON"),
])
def test_scale_results_reader_refuses_what_was_not_declared(tmp_path, case, message):
    """Only the declared format is read: another shape (a hand-made table, another tool's
    JSON, rows or results missing a declared field) is one error line naming the file."""
    good = _sweep_doc([("base", None, None, 20.0, 0.3), ("tuned", 1.0, None, 30.0, 0.6),
                       ("scaled", 0.0, 4, 22.0, 0.5)])
    docs = {
        "flat list": [{"alpha": 0.0, "wikitext_ppl": 21.0, "acc": 0.5}],
        "no tag": _broken(good, lambda d: d.pop("format")),
        "other tag": _broken(good, lambda d: d.update(format="intruder.scale-results/2")),
        "rows elsewhere": _broken(good, lambda d: d.update(rows=d.pop("models"))),
        "metric mapping": _broken(good, _metric_mapping),
        "guessed role": _broken(good, lambda d: d["models"][2].update(role="alpha")),
        "scaled without alpha": _broken(good, lambda d: d["models"][2].update(alpha=None)),
        "short result": _broken(good, lambda d: d["models"][1]["results"][0].pop("protocol")),
        "text value": _broken(good, lambda d: d["models"][1]["results"][1].update(value="0.6")),
    }
    path = tmp_path / "scale-results.json"
    path.write_text("{" if case == "not JSON" else json.dumps(docs[case]))
    with pytest.raises(ReportError) as err:
        load_scale_results(str(path))
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_scale_results_refused_by_load_report_and_the_cli(planted, tmp_path):
    """intruder.load_report and `intruder report --scale-results` give the reader's one line."""
    import intruder

    doc = _broken(_sweep_doc([("base", None, None, 20.0, 0.3), ("tuned", 1.0, None, 30.0, 0.6)]),
                  lambda d: d.pop("format"))
    bad = tmp_path / "scale-results.json"
    bad.write_text(json.dumps(doc))
    want = f"{bad}: not an intruder scale-results file (no format tag, expected " \
           f"'intruder.scale-results/1')"
    with pytest.raises(ReportError) as err:
        intruder.load_report(str(bad))
    assert str(err.value) == want
    scan = tmp_path / "scan.json"
    save_report(planted, str(scan))
    r = CliRunner().invoke(cli, ["report", str(scan), "-o", str(tmp_path / "a.html"),
                                 "--no-similarity", "--scale-results", str(bad)])
    assert r.exit_code == 1 and r.output == f"Error: {want}\n"
    assert not (tmp_path / "a.html").exists()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_report(planted, tmp_path):
    scan = tmp_path / "scan.json"
    save_report(planted, str(scan))
    out = tmp_path / "reports" / "audit.html"
    r = CliRunner().invoke(cli, ["report", str(scan), "-o", str(out), "--no-similarity"])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "Similarity heatmaps left out" in page
    assert json.loads(scan.read_text())["summary"]["total_intruders"] == 4
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "none.json"), "-o", str(out)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no scan report there" in r.output
    r = CliRunner().invoke(cli, ["report", str(scan), "-o", str(scan)])
    assert r.exit_code == 1 and "would overwrite the input" in r.output
    r = CliRunner().invoke(cli, ["report", str(scan), "-o", str(out), "--scale-results",
                                 str(tmp_path / "missing.json")])
    assert r.exit_code == 1 and "no scale results there" in r.output
    r = CliRunner().invoke(cli, ["report", str(scan), "-o", str(out), "--similarity",
                                 "--base", str(tmp_path / "gone.safetensors")])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "cannot recompute similarity heatmaps: base checkpoint" in r.output


def test_cli_report_finds_relative_checkpoints_beside_the_json(synth, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "ck").mkdir(parents=True)
    shutil.copy(synth["base_file"], work / "ck" / "b.safetensors")
    shutil.copy(synth["tuned_file"], work / "ck" / "t.safetensors")
    monkeypatch.chdir(work)
    r = CliRunner().invoke(cli, ["scan", "ck/b.safetensors", "ck/t.safetensors", "-q", "-o", "s.json"])
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["report", "work/s.json", "-o", "a.html"])
    assert r.exit_code == 0, r.output
    assert "similarity heatmaps recomputed" in r.output


def test_cli_scan_html(synth, tmp_path):
    out = tmp_path / "a.html"
    r = CliRunner().invoke(cli, ["scan", synth["base_file"], synth["adapter"], "-q", "-o",
                                 str(tmp_path / "s.json"), "--html", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    check_self_contained(page)
    assert re.search(r"LoRA-like update \(rank [^)]*\): 4 intruders at epsilon 0.5 in 3 of 3 "
                     r"changed matrices", page)
