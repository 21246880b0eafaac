"""Evaluators: WikiText-2 under the lm-eval protocol, multiple choice, held-out text, and the CLI.

Everything runs on a tiny Llama (hidden 32, 2 layers, context 128) with a byte-level BPE
tokenizer trained here from a few KB of WikiText validation text; the model gets 15 optimizer
steps so its predictions depend on context (a windowing or prefix mistake then moves the numbers
by far more than the tolerances below). Data comes from $INTRUDER_DATA_DIR (default
<repo>/../shared/data); tests that need it skip when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from intruder.errors import EvalError  # noqa: E402
from intruder.evaluate import evaluate_model, get_evaluator, load_model  # noqa: E402
from intruder.evaluate.data import count_words, detokenize, load_wikitext  # noqa: E402
from intruder.evaluate.scoring import rolling_windows, score_requests, sliding_windows  # noqa: E402
from intruder.evaluate.task import TaskEvaluator, load_choice_items  # noqa: E402
from intruder.evaluate.wikitext import WikitextEvaluator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("INTRUDER_DATA_DIR", REPO.parent / "shared" / "data"))
WIKI_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw"
WINOGRANDE = DATA_DIR / "winogrande" / "test.json"
SIQA = DATA_DIR / "social_i_qa" / "test.json"
needs_data = pytest.mark.skipif(not WIKI_TEST.is_file(), reason=f"no WikiText data under {DATA_DIR}")
CTX = 128  # tiny model's max_position_embeddings


# --- fixtures (the tiny model is built once per session) ----------------------------------------
def _training_text() -> str:
    if WIKI_VALID.is_file():
        return WIKI_VALID.read_text(encoding="utf-8")[:24000]
    words = "the of and a to in is was for on as with by he at from his an were are".split()
    g = torch.Generator().manual_seed(0)
    return " ".join(words[int(i)] for i in torch.randint(len(words), (4000,), generator=g))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A seeded tiny Llama + byte-level BPE tokenizer (adds BOS by default) saved to a tmp dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = _training_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Like Llama's tokenizer, add BOS by default: the evaluators must not depend on that.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>")

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=CTX, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor(hf_tok.encode(text, add_special_tokens=False))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        starts = torch.randint(0, len(ids) - CTX - 1, (4,), generator=g)
        x = torch.stack([ids[s:s + CTX] for s in starts])  # (4, CTX)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def corpus():
    if not WIKI_TEST.is_file():
        pytest.skip(f"no WikiText data under {DATA_DIR}")
    return load_wikitext(str(WIKI_TEST))


def _logprobs(lm, ids):
    """Natural-log probabilities of ids[1:] given the prefix, one unbatched forward pass."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)  # (T, V)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1), logits[:-1].argmax(-1)


# --- (b) documents and detokenization ------------------------------------------------------------
@needs_data
def test_wikitext_splits_into_62_articles_with_independent_counts(corpus):
    raw = WIKI_TEST.read_text(encoding="utf-8")
    # Independent split: character offsets of level-1 title lines, found by one regex.
    starts = [m.start() for m in re.finditer(r"^ = [^=\n](?:[^\n]*[^=\n])? = $", raw, re.M)]
    pages = [raw[a:b - 1] for a, b in zip(starts, starts[1:] + [len(raw) + 1])]
    assert len(corpus.documents) == len(pages) == 62
    assert [d.text for d in corpus.documents] == pages
    words = sum(count_words(d.text) for d in corpus.documents)
    # README: 241,211 whitespace-separated words; lm-eval's re.split also counts the empty piece
    # before each article's leading blank and after its trailing blank line: 2 per article.
    assert len(raw.split()) == 241_211
    assert words == sum(len(re.split(r"\s+", p)) for p in pages) == 241_211 + 2 * 62
    # Articles cover the file but the leading " \n" and the 61 newlines that join them.
    assert sum(len(d.text.encode()) for d in corpus.documents) == len(raw.encode()) - 2 - 61
    assert corpus.documents[0].text.startswith(" = Robert Boulter = \n")


@needs_data
def test_hf_rows_reproduce_the_line_dataset_join(corpus):
    """'\\n\\n'.join of the HF line rows is 1,307,975 bytes once LF -> CRLF (data README)."""
    text = "\n\n".join(corpus.hf_rows())
    assert len(corpus.hf_rows()) == 4358
    assert len(text.encode()) + text.count("\n") == 1_307_975


@needs_data
def test_detokenizer_matches_lm_eval(corpus):
    pre = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    for d in corpus.documents:
        assert detokenize(d.text) == pre.wikitext_detokenizer({"page": d.text})
    assert detokenize("a @-@ b , c 's ( x ) = = H = =") == "a-b, c's (x) == H =="


# --- windows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_rolling_windows_cover_each_token_once(L):
    for n in range(0, 30):
        toks = list(range(100, 100 + n))
        wins = rolling_windows(toks, -1, L)
        assert [t for _, cont in wins for t in cont] == toks
        for ctx, cont in wins:
            start = toks.index(cont[0])
            inp = (ctx + cont)[-(L + 1):][:-1]  # what the model reads
            assert len(cont) <= L and len(inp) == min(L, start + len(cont))
            # context is the prefix token, or the tokens right before the continuation
            assert ctx == [-1] if start == 0 else ctx == toks[start - len(ctx):start]
        utils = _lm_eval_utils()
        if utils is not None:
            ref = [utils.make_disjoint_window(w) for w in
                   utils.get_rolling_token_windows(toks, -1, L, 1)]
            assert [(list(a), list(b)) for a, b in ref] == [(list(a), list(b)) for a, b in wins]


def _lm_eval_utils():
    try:
        import lm_eval.utils as utils
    except ImportError:
        return None
    return utils


def test_sliding_windows_score_n_minus_overlap_tokens():
    toks = list(range(50))
    for L, stride in [(8, 8), (8, 3), (16, 5), (10, 10)]:
        wins = sliding_windows(toks, L, stride)
        scored = [t for _, cont in wins for t in cont]
        assert len(set(scored)) == len(scored)  # never twice
        assert all(len(ctx) + len(cont) <= L for ctx, cont in wins)
        skipped = set(toks) - set(scored)
        # only the very first token, plus one per non-overlapping window when stride == L
        assert 0 in skipped and len(skipped) == (1 if stride < L else -(-len(toks) // L))


# --- (a) WikiText metrics equal lm-evaluation-harness --------------------------------------------
@needs_data
def test_wikitext_matches_lm_eval_harness(tiny_model_dir, lm, corpus, tmp_path, monkeypatch):
    """Our word/byte perplexity and bits per byte equal lm-eval 0.4.13's own run (HFLM + its
    wikitext task YAML, detokenizer and aggregation) within 1e-4 relative.

    lm-eval reads the same articles from a local JSONL through a task that `include`s its packaged
    wikitext.yaml and only swaps the dataset (no network). HFLM gets add_bos_token=False:
    lm-eval 0.4.13 otherwise encodes documents with the tokenizer's default special tokens, so a
    tokenizer that adds BOS (ours, Llama's) is scored on [BOS, BOS, ...]; earlier 0.4.x releases
    and our protocol encode without special tokens and condition the first window on one BOS.
    """
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    n_docs = 2
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"page": d.text}) + "\n" for d in corpus.documents[:n_docs]))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    packaged = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    (task_dir / "wikitext_local.yaml").write_text(
        f"include: {packaged}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hflm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=16, dtype="float32",
                add_bos_token=False)
    out = simple_evaluate(model=hflm, tasks=["wikitext_local"], num_fewshot=0, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          log_samples=False, verbosity="ERROR")
    ref = out["results"]["wikitext_local"]

    ours = {r.metric: r for r in WikitextEvaluator(str(WIKI_TEST), stride=None).evaluate(
        lm, limit=n_docs, progress=False)}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric].value == pytest.approx(ref[f"{metric},none"], rel=1e-4), metric
        assert "lm-eval wikitext" in ours[metric].protocol
    assert "token_perplexity" not in ours  # stride=None skips the other protocol


@needs_data
def test_wikitext_rolling_equals_direct_computation(lm, corpus):
    """Independent of lm-eval: score one article window by window with plain forward passes."""
    page = corpus.documents[0].text
    ids = lm.tokenizer.encode(detokenize(page), add_special_tokens=False)
    total, pos = 0.0, 0
    while pos < len(ids):  # predict ids[pos:pos+CTX] from the CTX tokens before them (BOS first)
        stop = min(pos + CTX, len(ids))
        seq = ([lm.tokenizer.bos_token_id] + ids)[max(0, stop - CTX):stop + 1]
        lp, _ = _logprobs(lm, seq)
        total += float(lp[-(stop - pos):].sum())
        pos = stop
    res = {r.metric: r for r in WikitextEvaluator(str(WIKI_TEST), stride=None).evaluate(
        lm, limit=1, progress=False)}
    words, n_bytes = count_words(page), len(page.encode())
    assert res["word_perplexity"].n_units == words
    assert res["word_perplexity"].value == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert res["byte_perplexity"].value == pytest.approx(math.exp(-total / n_bytes), rel=1e-5)
    assert res["bits_per_byte"].value == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)


@needs_data
def test_sliding_token_perplexity_equals_hf_guide_loop(lm, corpus):
    """token_perplexity equals the transformers perplexity-guide loop (labels=-100 masking)."""
    from intruder.evaluate.data import WikiCorpus, split_documents

    # The first 12 raw lines (part of the first article) keep the unbatched loop below short.
    raw_lines = corpus.lines[:12]
    small = WikiCorpus(lines=raw_lines, documents=tuple(split_documents(raw_lines)), source="head")
    lines = WIKI_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:12]
    text = "\n\n".join(ln if ln.strip() else "" for ln in lines)
    enc = torch.tensor([lm.tokenizer(text)["input_ids"]])  # (1, n) with the tokenizer's BOS
    for stride in (50, CTX):
        nll, count, prev_end = 0.0, 0, 0
        for begin in range(0, enc.size(1), stride):
            end = min(begin + CTX, enc.size(1))
            trg = end - prev_end
            inp = enc[:, begin:end]
            tgt = inp.clone()
            tgt[:, :-trg] = -100
            with torch.no_grad():
                loss = lm.model(input_ids=inp, labels=tgt).loss
            # the model shifts labels left: position 0's label is never a prediction. (The guide
            # subtracts one per window instead, which over-subtracts when windows overlap.)
            n_loss = int((tgt[:, 1:] != -100).sum())
            nll += float(loss) * n_loss
            count += n_loss
            prev_end = end
            if end == enc.size(1):
                break
        res = WikitextEvaluator(str(WIKI_TEST), stride=stride).sliding(lm, small, 1, progress=False)
        assert res.n_units == count
        assert res.value == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert f"stride {stride}" in res.protocol and "perplexity guide" in res.protocol


# --- (c) multiple choice against a hand computation ----------------------------------------------
def _hand_loglik(lm, context: str, continuation: str) -> float:
    tok = lm.tokenizer
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n_cont = len(whole) - len(ctx)
    seq = ([tok.bos_token_id] + whole)[-(CTX + 1):]  # longer items lose context on the left
    lp, _ = _logprobs(lm, seq)
    return float(lp[-n_cont:].sum())  # positions that predict the continuation tokens


@pytest.mark.skipif(not (WINOGRANDE.is_file() and SIQA.is_file()), reason="no task data")
def test_multiple_choice_agrees_with_hand_computation(lm):
    wino = load_choice_items(WINOGRANDE, limit=3)
    assert wino[0].options == ("Sarah", "Maria") and wino[0].label == 1
    siqa = load_choice_items(SIQA, limit=2)
    assert siqa[0].options == ("make a new plan", "Go home and see Riley", "Find somewhere to go")
    assert siqa[0].label == 2

    hand = {  # contexts and continuations written out by hand for the first item of each file
        "wino": [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                 ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")],
        "siqa": [("Question: Tracy didn't go home that evening and resisted Riley's attacks. What does "
                  "Tracy need to do before this?\nAnswer:", " " + o) for o in siqa[0].options],
    }
    assert wino[0].requests() == hand["wino"] and siqa[0].requests() == hand["siqa"]

    for path, items, limit in ((WINOGRANDE, wino, 3), (SIQA, siqa, 2)):
        ev = TaskEvaluator(str(path))
        got = ev.option_logliks(lm, items)
        correct = 0
        for item, lls in zip(items, got):
            want = [_hand_loglik(lm, c, x) for c, x in item.requests()]
            assert lls == pytest.approx(want, abs=1e-4)
            correct += int(max(range(len(want)), key=want.__getitem__) == item.label)
        res = {r.metric: r for r in ev.evaluate(lm, limit=limit, progress=False)}
        assert res["accuracy"].value == pytest.approx(correct / limit)
        assert res["accuracy"].n_units == limit and res["accuracy"].evaluator == ev.name
        assert "lm-eval multiple choice" in res["accuracy"].protocol
        assert 0.0 <= res["acc_norm"].value <= 1.0


def test_option_parsing_rules(tmp_path):
    items = [
        {"instruction": "Please choose the correct answer to the question: Sam wrote 'Answer1: "
                        "yes' on the form. What did Sam do?\n\nAnswer1: wrote yes Answer2: left "
                        "at 10:30 Answer3: nothing\n\nAnswer format: answer1/answer2/answer3",
         "input": "", "answer": "answer3"},
        {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1},
    ]
    p = tmp_path / "mc.json"
    p.write_text(json.dumps(items))
    a, b = load_choice_items(p)
    # a marker look-alike in the stem is superseded by the real list that follows it
    assert a.stem == "Sam wrote 'Answer1: yes' on the form. What did Sam do?" and a.label == 2
    assert a.options == ("wrote yes", "left at 10:30", "nothing")
    assert b.options == ("3", "4") and b.label == 1 and not b.has_blank
    p.write_text(json.dumps([{"instruction": "Pick: Option1: a Option2: b", "answer": "option3"}]))
    with pytest.raises(EvalError, match=r"mc.json item 0: answer 'option3' out of range 1..2"):
        load_choice_items(p)


def test_text_task_loss_and_accuracy(lm, tmp_path):
    text = "The cat sat on the mat.\nIt was a sunny day in the park.\n"
    p = tmp_path / "held_out.txt"
    p.write_text(text)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) < CTX  # one window: the direct computation below is exact
    lp, pred = _logprobs(lm, [lm.tokenizer.bos_token_id] + ids)
    res = {r.metric: r for r in TaskEvaluator(str(p)).evaluate(lm, progress=False)}
    assert res["token_loss"].n_units == len(ids)
    assert res["token_loss"].value == pytest.approx(-float(lp.mean()), rel=1e-5)
    assert res["next_token_accuracy"].value == pytest.approx(
        float((pred == torch.tensor(ids)).double().mean()))
    assert "nats per token" in res["token_loss"].unit


# --- loading ---------------------------------------------------------------------------------------
def test_bare_safetensors_needs_config_and_loads_same_weights(tiny_model_dir, lm, tmp_path):
    import shutil

    bare = tmp_path / "scaled.safetensors"
    shutil.copy(tiny_model_dir / "model.safetensors", bare)
    with pytest.raises(EvalError, match="scaled.safetensors.*--model-config"):
        load_model(bare, device="cpu")
    lm2 = load_model(bare, model_config=tiny_model_dir, device="cpu", max_length=64)
    assert lm2.max_length == 64 and lm.max_length == CTX
    reqs = [([0, 5, 6], [7, 8, 9])]
    assert score_requests(lm2, reqs)[0].loglik == pytest.approx(score_requests(lm, reqs)[0].loglik,
                                                                abs=1e-6)


def test_batched_scoring_equals_one_at_a_time(lm):
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(3, lm.vocab_size(), (int(a),), generator=g).tolist(),
             torch.randint(3, lm.vocab_size(), (int(b),), generator=g).tolist())
            for a, b in [(1, 5), (40, 3), (7, 90), (1, 128), (200, 20)]]
    together = score_requests(lm, reqs, batch_size=5)
    alone = [score_requests(lm, [r], batch_size=1)[0] for r in reqs]
    for x, y in zip(together, alone):
        assert x.loglik == pytest.approx(y.loglik, abs=1e-4) and x.n_tokens == y.n_tokens


# --- (d) registry and CLI -----------------------------------------------------------------------------
def test_unknown_evaluator_suggests_a_name():
    with pytest.raises(EvalError, match=r"unknown evaluator 'wikitxt'; did you mean 'wikitext'\?"):
        get_evaluator("wikitxt")
    with pytest.raises(EvalError, match="task:PATH"):
        get_evaluator("task")
    assert get_evaluator("wikitext:/some/wiki.test.raw").path == "/some/wiki.test.raw"


def test_missing_wikitext_data_says_how_to_point_at_it(monkeypatch, tmp_path):
    monkeypatch.delenv("INTRUDER_WIKITEXT", raising=False)
    monkeypatch.setenv("INTRUDER_DATA_DIR", str(tmp_path))
    with pytest.raises(EvalError, match="INTRUDER_DATA_DIR"):
        load_wikitext()


def test_offline_without_local_data_fails_fast_with_advice(monkeypatch):
    for var in ("INTRUDER_WIKITEXT", "INTRUDER_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError, match=r"hub is offline: pass --eval wikitext:/path/to/wiki.test.raw"):
        load_wikitext()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_model_dir, lm, tmp_path):
    gpu = load_model(tiny_model_dir, device="cuda", dtype="float32")
    assert gpu.device == "cuda" and next(gpu.model.parameters()).is_cuda
    g = torch.Generator().manual_seed(2)
    reqs = [([0] + torch.randint(3, lm.vocab_size(), (int(a),), generator=g).tolist(),
             torch.randint(3, lm.vocab_size(), (int(b),), generator=g).tolist()) for a, b in [(3, 60), (90, 40)]]
    for x, y in zip(score_requests(lm, reqs), score_requests(gpu, reqs)):
        assert y.loglik == pytest.approx(x.loglik, rel=1e-4)
    p = tmp_path / "t.txt"
    p.write_text("Some held-out text, long enough to span two windows of the tiny model. " * 8)
    a, b = TaskEvaluator(str(p)).evaluate(lm, progress=False), TaskEvaluator(str(p)).evaluate(gpu, progress=False)
    assert b[0].value == pytest.approx(a[0].value, rel=1e-4)


@needs_data
def test_evaluate_model_library_entry(tiny_model_dir):
    res = evaluate_model(tiny_model_dir, [f"wikitext-sliding:{WIKI_TEST}"], device="cpu", limit=1,
                         progress=False)
    assert [r.metric for r in res] == ["word_perplexity", "byte_perplexity", "bits_per_byte",
                                       "token_perplexity"]
    assert all(r.protocol and r.unit and r.n_units > 0 and math.isfinite(r.value) for r in res)


@pytest.fixture
def runner(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("INTRUDER_DATA_DIR", str(DATA_DIR))
    monkeypatch.delenv("INTRUDER_WIKITEXT", raising=False)
    return CliRunner()


@needs_data
@pytest.mark.skipif(not WINOGRANDE.is_file(), reason="no task data")
def test_cli_table_and_json(runner, tiny_model_dir):
    from intruder.cli import cli

    args = ["eval", str(tiny_model_dir), "--eval", "wikitext-sliding", "--eval", f"task:{WINOGRANDE}",
            "--limit", "1", "--device", "cpu", "-q"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert out.splitlines()[0].split() == ["evaluator", "metric", "value", "n", "protocol"]
    for needle in ("word_perplexity", "bits_per_byte", "token_perplexity", "lm-eval wikitext",
                   "transformers perplexity guide", "task:winogrande", "accuracy",
                   "lm-eval multiple choice", " words ", " items "):
        assert needle in out, needle
    assert res.stderr == ""  # -q: no chatter

    res = runner.invoke(cli, args + ["--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["limit"] == 1 and doc["max_length"] == CTX
    assert [r["metric"] for r in doc["results"]] == [
        "word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity",
        "accuracy", "acc_norm"]
    assert all(r["protocol"] and r["unit"] for r in doc["results"])
    assert doc["results"][0]["extra"]["documents"] == 1


def test_cli_unknown_evaluator_is_one_line_error(runner, tiny_model_dir):
    from intruder.cli import cli

    res = runner.invoke(cli, ["eval", str(tiny_model_dir), "--eval", "wikitxt"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        "Error: unknown evaluator 'wikitxt'; did you mean 'wikitext'? "
        "(available: wikitext[:PATH], wikitext-sliding[:PATH], task:PATH, "
        "lm-eval:TASK[,TASK...])"]
