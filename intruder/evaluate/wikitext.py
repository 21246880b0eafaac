"""WikiText-2 perplexity: lm-eval's `wikitext` task, plus the HF guide's sliding-window token perplexity.

Two protocols, reported under different metric names and never mixed:

* lm-eval (`word_perplexity`, `byte_perplexity`, `bits_per_byte`): each article is detokenized,
  tokenized without special tokens, and scored as rolling log-likelihood in disjoint windows of
  the model's max length, the first window conditioned on BOS (else EOS). The summed
  log-likelihoods are normalised by words and UTF-8 bytes of the ORIGINAL article text.
* transformers perplexity guide (`token_perplexity`, only with `--eval wikitext-sliding`): the
  line-level test rows joined with "\\n\\n", tokenized as the guide does (tokenizer defaults),
  scored with windows of max length and stride 512; perplexity per scored token. Each window
  re-reads max_length - 512 tokens of context, so this pass costs about max_length / 512 times
  the rolling pass (8x at 4096): opt-in for that reason.
"""

from __future__ import annotations

import math

from ..types import EvalResult
from .data import WikiCorpus, count_words, detokenize, load_wikitext
from .scoring import rolling_windows, score_requests, sliding_windows

DEFAULT_STRIDE = 512


class WikitextEvaluator:
    """`--eval wikitext[:PATH]`: WikiText-2 raw test perplexity."""

    name = "wikitext"

    def __init__(self, path: str | None = None, stride: int | None = None,
                 batch_size: int | None = None, limit: int | None = None):
        """Args:
            path: wiki.test.raw (or a folder holding it); None looks in the environment.
            stride: sliding-window stride for token_perplexity (DEFAULT_STRIDE is the guide's);
                None (the default) skips that metric.
            limit: articles scored when evaluate() is given no limit of its own (None: all).
        """
        self.path = path
        self.limit = limit
        self.stride = stride
        self.batch_size = batch_size
        self._corpus: WikiCorpus | None = None

    def corpus(self) -> WikiCorpus:
        if self._corpus is None:
            self._corpus = load_wikitext(self.path)
        return self._corpus

    def check(self, limit: int | None = None) -> str:
        """Find and read the data now (before any model work); returns what will be scored."""
        corpus = self.corpus()
        n = min(limit or len(corpus.documents), len(corpus.documents))
        return f"{self.name}: {n} of {len(corpus.documents)} articles from {corpus.source}"

    def evaluate(self, lm, limit: int | None = None, progress: bool = True) -> list[EvalResult]:
        """Score the first `limit` articles (all when None) and return the four metrics."""
        corpus = self.corpus()
        limit = limit if limit is not None else self.limit
        docs = corpus.documents[:limit] if limit else corpus.documents
        results = self.rolling(lm, [d.text for d in docs], progress=progress, source=corpus.source)
        if self.stride:
            results.append(self.sliding(lm, corpus, n_docs=len(docs), progress=progress))
        return results

    def rolling(self, lm, pages: list[str], progress: bool = True,
                source: str = "") -> list[EvalResult]:
        """lm-eval's loglikelihood_rolling over `pages` (original, not yet detokenized, text)."""
        prefix = lm.prefix_token_id
        requests, owner = [], []
        for d, page in enumerate(pages):
            windows = rolling_windows(lm.encode(detokenize(page)), prefix, lm.max_length)
            requests.extend(windows)
            owner.extend([d] * len(windows))
        scores = score_requests(lm, requests, batch_size=self.batch_size, progress=progress,
                                desc="wikitext rolling")
        doc_ll = [0.0] * len(pages)
        for d, s in zip(owner, scores):
            doc_ll[d] += s.loglik
        ll = math.fsum(doc_ll)
        words = sum(count_words(p) for p in pages)
        n_bytes = sum(len(p.encode("utf-8")) for p in pages)
        n_tokens = sum(s.n_tokens for s in scores)

        prefix_name = "BOS" if prefix == lm.tokenizer.bos_token_id else "EOS"
        protocol = (f"lm-eval wikitext: {len(pages)} detokenized wikitext-2-raw-v1 test articles "
                    f"encoded without special tokens, rolling loglikelihood in disjoint windows "
                    f"of {lm.max_length} tokens, first window after one {prefix_name} (equals "
                    f"lm-eval 0.4.13 run with add_bos_token=False)")
        extra = (("documents", len(pages)), ("loglikelihood", ll), ("tokens", n_tokens),
                 ("words", words), ("bytes", n_bytes), ("source", source))
        mk = lambda metric, value, n, unit: EvalResult(  # noqa: E731
            evaluator=self.name, metric=metric, value=value, n_units=n, unit=unit,
            protocol=protocol, extra=extra)
        return [
            mk("word_perplexity", math.exp(-ll / words), words,
               "words (original text, split on whitespace); perplexity per word"),
            mk("byte_perplexity", math.exp(-ll / n_bytes), n_bytes,
               "bytes (UTF-8, original text); perplexity per byte"),
            mk("bits_per_byte", -ll / n_bytes / math.log(2), n_bytes,
               "bytes (UTF-8, original text); bits per byte"),
        ]

    def sliding(self, lm, corpus: WikiCorpus, n_docs: int | None = None,
                progress: bool = True) -> EvalResult:
        """Token perplexity with strided windows (transformers perplexity guide)."""
        text = "\n\n".join(corpus.hf_rows(n_docs))
        tokens = lm.encode(text, add_special_tokens=True)  # the guide calls tokenizer(text)
        stride = min(self.stride or DEFAULT_STRIDE, lm.max_length)
        requests = sliding_windows(tokens, lm.max_length, stride)
        scores = score_requests(lm, requests, batch_size=self.batch_size, progress=progress,
                                desc="wikitext sliding")
        ll = math.fsum(s.loglik for s in scores)
        n = sum(s.n_tokens for s in scores)
        n_docs = len(corpus.documents) if n_docs is None else n_docs
        protocol = (f"transformers perplexity guide: '\\n\\n'.join(test rows) of {n_docs} "
                    f"articles, sliding window {lm.max_length} tokens, stride {stride}")
        return EvalResult(
            evaluator=self.name, metric="token_perplexity", value=math.exp(-ll / max(n, 1)),
            n_units=n, unit="tokens scored (model's tokenizer); perplexity per token",
            protocol=protocol,
            extra=(("documents", n_docs), ("loglikelihood", ll), ("source", corpus.source)))
