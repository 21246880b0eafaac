"""`--eval task:PATH`: multiple-choice accuracy from a JSON file, or held-out loss from a text file.

JSON tasks are lists of items `{"instruction", "input", "output", "answer"}` as in the WinoGrande
and Social IQa files of the intruder-dimensions repo. The options are written into the
instruction; we parse them back out:

1. A trailing `Answer format: ...` line is dropped.
2. The item's `answer` (`option2`, `answer3`, `Answer 2`) names the marker word; option markers
   are that word, a number and a colon (`Option1:`, `Answer2:`; any case, optional space before
   the number). We take the last run numbered 1, 2, ..., k (k >= 2) in order; each option is the
   text up to the next marker. A bare numeric answer (`2`) uses the word of the last `Word1:`.
3. The stem is the text before the first marker, with a leading `Please choose the correct
   answer ...:` prompt removed; a non-empty `input` is appended on a new line.

Items may instead give the options directly: `{"question"|"sentence"|"context", "choices": [...],
"answer": index or label}`.

Scoring follows lm-eval's multiple-choice tasks: each option is a continuation whose summed
log-likelihood is compared, with the context prefixed by BOS (else EOS):
* a stem with a single blank `_` (WinoGrande) uses lm-eval's partial scoring: the context is the
  stem up to the blank with the option filled in, the continuation is the rest of the sentence
  (the same for every option);
* otherwise the context is `Question: {stem}\\nAnswer:` and the continuation ` {option}`.
`accuracy` takes the argmax of the log-likelihoods, `acc_norm` of log-likelihood per UTF-8 byte of
the option text (lm-eval's acc_norm, which counts characters; the same for ASCII).

A `.txt` file is held-out text: its first `limit` lines (all by default) are tokenized as one stream
and scored in disjoint rolling windows after BOS; we report the loss in nats per token and the
next-token accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvalError
from ..io.jsonfile import read_json, read_jsonl
from ..types import EvalResult
from .scoring import rolling_windows, score_requests

_MARKER = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]+) ?([0-9]+):\s*")
_FORMAT_TAIL = re.compile(r"\s*Answer format:.*\Z", re.IGNORECASE | re.DOTALL)
_PROMPT = re.compile(r"\A\s*Please choose the correct (?:answer|option)[^:\n]*:\s*", re.IGNORECASE)
_LABEL = re.compile(r"\A\s*([A-Za-z]*)\s*([0-9]+)\s*\Z")
_GENERIC_STEMS = {"test", "dev", "validation", "valid", "val", "train", "eval", "data"}


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question, parsed."""

    stem: str  # question or sentence, prompt removed
    options: tuple[str, ...]
    label: int  # index of the correct option

    @property
    def has_blank(self) -> bool:
        return self.stem.count("_") == 1

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) strings per option, lm-eval style."""
        if self.has_blank:
            head, tail = self.stem.split("_")
            tail = tail.strip()
            if tail:  # WinoGrande partial scoring: the shared tail is the continuation
                return [(head + opt, " " + tail) for opt in self.options]
            return [(head.rstrip(), " " + opt) for opt in self.options]
        context = f"Question: {self.stem}\nAnswer:"
        return [(context, " " + opt) for opt in self.options]

    def norm_lengths(self) -> list[int]:
        """Bytes that acc_norm divides by: the option text (the shared tail for blank items)."""
        if self.has_blank and self.stem.split("_")[1].strip():
            tail = self.stem.split("_")[1].strip()
            return [len(tail.encode("utf-8"))] * len(self.options)
        return [len(opt.encode("utf-8")) for opt in self.options]


def parse_item(item: dict, where: str = "") -> ChoiceItem:
    """Turn one JSON item into a ChoiceItem (see the module docstring for the rules)."""
    if not isinstance(item, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "choices" in item:
        return _parse_explicit(item, where)
    text = item.get("instruction")
    if not isinstance(text, str) or not text.strip():
        raise EvalError(f"{where}: no 'instruction' text (or 'choices' list)")
    text = _FORMAT_TAIL.sub("", text)
    answer = item.get("answer")
    m = _LABEL.match(str(answer)) if answer is not None else None
    word = m.group(1).lower() if m and m.group(1) else _guess_marker_word(text)
    marks = _option_markers(text, word)
    if len(marks) < 2:
        raise EvalError(f"{where}: found {len(marks)} option markers like '{(word or 'Option').title()}1:' "
                        "in the instruction; need at least 2")
    options = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        opt = text[m.end():nxt.start() if nxt else len(text)].strip()
        if not opt:
            raise EvalError(f"{where}: option {m.group(0).strip()} is empty")
        options.append(opt)
    stem = _PROMPT.sub("", text[:marks[0].start()]).strip()
    extra = item.get("input")
    if isinstance(extra, str) and extra.strip():
        stem = f"{stem}\n{extra.strip()}"
    if not stem:
        raise EvalError(f"{where}: no question text before the options")
    label = _label_index(answer, len(options), word, where)
    return ChoiceItem(stem=stem, options=tuple(options), label=label)


def _guess_marker_word(text: str) -> str | None:
    """With a bare numeric answer: the word of the last 'Word1:' marker in the text."""
    ones = [m.group(1).lower() for m in _MARKER.finditer(text) if m.group(2) == "1"]
    return ones[-1] if ones else None


def _option_markers(text: str, word: str | None) -> list:
    """The last run of markers `word1:`, `word2:`, ... in order.

    A later `word1:` restarts the run, so a marker-like phrase in the stem is superseded by the
    real list; out-of-sequence look-alikes (`at 10:30` in an option) stay part of the option text.
    """
    if not word:
        return []
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + re.escape(word) + r") ?([0-9]+):\s*", re.IGNORECASE)
    run: list = []
    for m in pattern.finditer(text):
        n = int(m.group(2))
        if n == 1:
            run = [m]
        elif run and n == len(run) + 1:
            run.append(m)
    return run


def _parse_explicit(item: dict, where: str) -> ChoiceItem:
    choices = item["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise EvalError(f"{where}: 'choices' must be a list of at least 2 strings")
    stem = next((item[k] for k in ("question", "sentence", "context", "instruction")
                 if isinstance(item.get(k), str) and item[k].strip()), "")
    if not stem:
        raise EvalError(f"{where}: no 'question'/'sentence'/'context' text")
    answer = item.get("answer", item.get("label"))
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise EvalError(f"{where}: answer index {answer} out of range 0..{len(choices) - 1}")
        label = answer
    else:
        label = _label_index(answer, len(choices), None, where)
    return ChoiceItem(stem=stem.strip(), options=tuple(c.strip() for c in choices), label=label)


def _label_index(answer, k: int, word: str | None, where: str) -> int:
    """'option2' / 'Answer 2' / '2' -> 1 (labels are 1-based in the files)."""
    m = _LABEL.match(str(answer)) if answer is not None else None
    if not m or (m.group(1) and word and m.group(1).lower() != word):
        raise EvalError(f"{where}: answer {answer!r} does not name an option ({word or 'choice'}1..{k})")
    n = int(m.group(2))
    if not 1 <= n <= k:
        raise EvalError(f"{where}: answer {answer!r} out of range 1..{k}")
    return n - 1


def load_choice_items(path: Path, limit: int | None = None) -> list[ChoiceItem]:
    """Read and parse a JSON (list) or JSONL multiple-choice file."""
    reader = read_jsonl if path.suffix == ".jsonl" else read_json
    data = reader(str(path), EvalError, "task file", max_bytes=None)  # capped, strict, one line
    if not isinstance(data, list) or not data:
        raise EvalError(f"task file {path} must hold a non-empty JSON list of items")
    data = data[:limit] if limit else data
    return [parse_item(it, f"{path.name} item {i}") for i, it in enumerate(data)]


def task_name(path: Path) -> str:
    """'winogrande/test.json' -> 'winogrande'; 'mc.json' -> 'mc'."""
    return path.parent.name if path.stem.lower() in _GENERIC_STEMS and path.parent.name else path.stem


class TaskEvaluator:
    """`--eval task:PATH`: multiple-choice accuracy (.json/.jsonl) or held-out text loss (.txt)."""

    def __init__(self, path: str, batch_size: int | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise EvalError(f"task file not found: {self.path}")
        if self.path.suffix not in (".json", ".jsonl", ".txt"):
            raise EvalError(f"task file {self.path} must be .json/.jsonl (multiple choice) or .txt (text)")
        self.name = f"task:{task_name(self.path)}"
        self.batch_size = batch_size

    def check(self, limit: int | None = None) -> str:
        """Read and parse the file now (before any model work); returns what will be scored."""
        if self.path.suffix == ".txt":
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise EvalError(f"cannot read {self.path}: {exc}") from exc
            if not any(ln.strip() for ln in lines[:limit]):
                raise EvalError(f"{self.path} has no text to score")
            return f"{self.name}: {len(lines[:limit])} lines of held-out text"
        items = load_choice_items(self.path, limit)
        return f"{self.name}: {len(items)} multiple-choice items"

    def evaluate(self, lm, limit: int | None = None, progress: bool = True) -> list[EvalResult]:
        """Score the first `limit` items (or lines of a .txt file)."""
        if self.path.suffix == ".txt":
            return self._text(lm, limit, progress)
        return self.choice(lm, load_choice_items(self.path, limit), progress)

    def option_logliks(self, lm, items: Sequence[ChoiceItem], progress: bool = False) -> list[list[float]]:
        """Summed log-likelihood of every option's continuation, per item."""
        prefix = lm.prefix_token_id
        requests, owner = [], []
        for i, item in enumerate(items):
            for ctx, cont in item.requests():
                ctx_ids, cont_ids = encode_pair(lm, ctx, cont)
                requests.append(([prefix] + ctx_ids, cont_ids))
                owner.append(i)
        scores = score_requests(lm, requests, batch_size=self.batch_size, progress=progress,
                                desc=self.name)
        out: list[list[float]] = [[] for _ in items]
        for i, s in zip(owner, scores):
            out[i].append(s.loglik)
        return out

    def choice(self, lm, items: Sequence[ChoiceItem], progress: bool = True) -> list[EvalResult]:
        lls = self.option_logliks(lm, items, progress)
        hits = hits_norm = 0
        for item, ll in zip(items, lls):
            hits += _argmax(ll) == item.label
            norm = [v / max(n, 1) for v, n in zip(ll, item.norm_lengths())]
            hits_norm += _argmax(norm) == item.label
        n = len(items)
        chance = sum(1.0 / len(it.options) for it in items) / n
        blank = sum(it.has_blank for it in items)
        style = ("partial scoring of the sentence after the blank" if blank == n else
                 "option log-likelihood after 'Question: ...\\nAnswer:'" if blank == 0 else
                 "partial scoring for blank items, option log-likelihood otherwise")
        protocol = f"lm-eval multiple choice, 0-shot, BOS-prefixed context, {style}"
        extra = (("chance", chance), ("correct", hits), ("source", str(self.path)))
        return [
            EvalResult(evaluator=self.name, metric="accuracy", value=hits / n, n_units=n,
                       unit="items; fraction correct (argmax of summed option log-likelihood)",
                       protocol=protocol, extra=extra),
            EvalResult(evaluator=self.name, metric="acc_norm", value=hits_norm / n, n_units=n,
                       unit="items; fraction correct (argmax of log-likelihood per option byte)",
                       protocol=protocol, extra=(("chance", chance), ("correct", hits_norm),
                                                 ("source", str(self.path)))),
        ]

    def _text(self, lm, limit: int | None, progress: bool) -> list[EvalResult]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EvalError(f"cannot read {self.path}: {exc}") from exc
        if limit:
            text = "".join(text.splitlines(keepends=True)[:limit])
        tokens = lm.encode(text)
        if not tokens:
            raise EvalError(f"{self.path} has no text to score")
        requests = rolling_windows(tokens, lm.prefix_token_id, lm.max_length)
        scores = score_requests(lm, requests, batch_size=self.batch_size, progress=progress,
                                desc=self.name)
        ll = math.fsum(s.loglik for s in scores)
        n = sum(s.n_tokens for s in scores)
        correct = sum(s.n_correct for s in scores)
        protocol = (f"held-out text, rolling loglikelihood in disjoint windows of {lm.max_length} "
                    "tokens after BOS")
        extra = (("loglikelihood", ll), ("source", str(self.path)))
        return [
            EvalResult(evaluator=self.name, metric="token_loss", value=-ll / n, n_units=n,
                       unit="tokens (model's tokenizer); nats per token", protocol=protocol,
                       extra=extra),
            EvalResult(evaluator=self.name, metric="next_token_accuracy", value=correct / n,
                       n_units=n, unit="tokens; fraction whose argmax prediction is correct",
                       protocol=protocol, extra=extra),
        ]


def encode_pair(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize context+continuation together and split, as lm-eval does.

    Trailing spaces of the context move to the continuation; the continuation's ids are what the
    joint encoding adds after the context's, so merges across the boundary stay faithful.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = lm.encode(context + continuation)
    ctx = lm.encode(context)
    cont = whole[len(ctx):]
    if not cont:
        raise EvalError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
