"""Token-level log-likelihood scoring shared by all evaluators.

Everything reduces to requests `(context, continuation)` of token ids: the model reads
`(context + continuation)[:-1]` (left-truncated to `max_length` tokens) and we sum the
log-probabilities it gives each continuation token. This is lm-eval's `_loglikelihood_tokens`
contract, so rolling windows, multiple-choice options and sliding windows share one batched loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..progress import bar

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)

# Logit elements (batch * positions * vocab) allowed per forward pass when no batch size is given.
CPU_LOGIT_BUDGET = 2 ** 26
CUDA_LOGIT_BUDGET = 2 ** 29
MAX_BATCH = 64


@dataclass(frozen=True)
class Score:
    """What the model gave one continuation."""

    loglik: float  # sum of natural-log probabilities of the continuation tokens
    n_tokens: int  # continuation length
    n_correct: int  # tokens that were the model's argmax (next-token accuracy)

    @property
    def greedy(self) -> bool:
        return self.n_correct == self.n_tokens


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Request]:
    """Disjoint prediction windows covering `tokens` once each (lm-eval, context_len=1).

    The first window predicts tokens[:L] from the prefix token; each later one predicts the next
    (up to) L tokens, conditioned on as many preceding tokens as fit in an L-token input. So a full
    window reads exactly one token of context, and the final short window reads a full L.
    """
    L = int(max_length)
    if L < 1:
        raise ValueError("max_length must be >= 1")
    n = len(tokens)
    if n == 0:
        return []
    tokens = list(tokens)
    first = min(L, n)
    out: list[Request] = [([prefix_token], tokens[:first])]
    for start in range(first, n, L):
        stop = min(start + L, n)
        # input = tokens[stop-L-1 : stop-1]: L tokens ending just before the last target
        out.append((tokens[stop - L - 1:start], tokens[start:stop]))
    return out


def sliding_windows(tokens: Sequence[int], max_length: int, stride: int) -> list[Request]:
    """Strided windows of the transformers perplexity guide.

    Window k reads tokens[b:e] with b = k*stride, e = min(b + L, n) and scores only the e - e_prev
    tokens not scored before. As in the guide (labels shifted inside the model), a window that
    does not overlap the previous one cannot predict its own first token: the very first token is
    never scored, and with stride == L one token per window is skipped.
    """
    L, n = int(max_length), len(tokens)
    if stride < 1 or stride > L:
        raise ValueError(f"stride must be in [1, max_length], got {stride}")
    tokens = list(tokens)
    out: list[Request] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + L, n)
        trg = end - prev_end  # new tokens this window is responsible for
        if end - trg == begin:
            trg -= 1  # no overlap (first window, or stride == L): its first token has no context
        if trg > 0:
            out.append((tokens[begin:end - trg], tokens[end - trg:end]))
        prev_end = end
        if end == n:
            break
    return out


def score_requests(lm, requests: Sequence[Request], *, batch_size: int | None = None,
                   progress: bool = False, desc: str = "scoring") -> list[Score]:
    """Score each request with one forward pass per batch; returns scores in request order.

    Requests are sorted longest first so a batch pads little and any OOM happens at once.
    Inputs are right-padded with an attention mask; a causal model's scored positions never see
    the padding. Log-probabilities are computed in float32 whatever the model's dtype.
    """
    import torch

    L = lm.max_length
    inputs: list[list[int]] = []
    for ctx, cont in requests:
        if len(cont) == 0:
            raise ValueError("empty continuation")
        if len(ctx) == 0:
            raise ValueError("empty context (prefix a BOS/EOS token)")
        if len(cont) > L:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max length {L}")
        whole = list(ctx) + list(cont)
        inputs.append(whole[-(L + 1):][:-1])  # left-truncate to L model inputs

    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    budget = CUDA_LOGIT_BUDGET if str(lm.device).startswith("cuda") else CPU_LOGIT_BUDGET
    vocab = lm.vocab_size()
    results: list[Score | None] = [None] * len(requests)
    pbar = bar(len(requests), desc, "seq", progress)
    pos = 0
    with torch.inference_mode():
        while pos < len(order):
            width = len(inputs[order[pos]])  # longest in this batch (sorted)
            bs = batch_size or max(1, min(MAX_BATCH, budget // max(1, width * vocab)))
            idx = order[pos:pos + bs]
            pos += len(idx)
            ids = torch.full((len(idx), width), lm.pad_token_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for r, i in enumerate(idx):
                ids[r, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
                mask[r, :len(inputs[i])] = 1
            logits = lm.model(input_ids=ids.to(lm.device),
                              attention_mask=mask.to(lm.device)).logits  # (B, T, V)
            for r, i in enumerate(idx):
                cont = list(requests[i][1])
                n_in, c = len(inputs[i]), len(cont)
                # logits at input position t predict token t+1: the last c inputs predict cont
                rows = logits[r, n_in - c:n_in].float()  # (c, V)
                logp = torch.log_softmax(rows, dim=-1)  # (c, V)
                target = torch.tensor(cont, dtype=torch.long, device=rows.device)  # (c,)
                ll = logp.gather(1, target[:, None]).squeeze(1)  # (c,)
                correct = (rows.argmax(dim=-1) == target).sum()
                results[i] = Score(loglik=float(ll.double().sum()), n_tokens=c,
                                   n_correct=int(correct))
            del logits
            if pbar is not None:
                pbar.update(len(idx))
    if pbar is not None:
        pbar.close()
    return results  # type: ignore[return-value]

