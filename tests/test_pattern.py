"""io/pattern.py: the linear-time matcher for adapter_config.json's rank_pattern / alpha_pattern
keys gives Python's answers (random keys against re.match), PEFT's selections for ordinary keys,
and refuses what it cannot match in linear time. The keys that hang Python's engine are in
tests/test_hostile_io.py."""

from __future__ import annotations

import re

import hostile_corpus as hc
import numpy as np
import pytest

from intruder.errors import AdapterError
from intruder.io import open_checkpoint


def _random_key(rng, depth=0):
    atoms = ["a", "b", "\\.", ".", "[ab]", "[^a]", "\\d", "\\w", "\\s", "_", "0", "[a-c0-9_]",
             "\\b", "\\B", "^", "$", "\\A", "\\Z", "(?:)", "é", "\n"]
    quants = ["", "", "", "*", "+", "?", "*?", "+?", "??", "{0,2}", "{1,3}", "{2}", "{2,}",
              "{1,2}?"]
    bounded = ["", "?", "??", "{0,2}", "{2}", "{1,2}?"]
    parts = []
    for _ in range(rng.integers(1, 4)):
        if depth < 2 and rng.random() < 0.3:
            inner = _random_key(rng, depth + 1)
            if rng.random() < 0.4:
                inner += "|" + _random_key(rng, depth + 1)
            atom = "(" + ("?:" if rng.random() < 0.3 else "") + inner + ")"
            # an unbounded repeat of a repeat is what makes Python's engine slow: leave those to
            # the timing test, compare answers on everything else
            q = str(rng.choice(bounded if re.search(r"[*+]|\{\d+,\}", inner) else quants))
        else:
            atom = str(rng.choice(atoms))
            q = "" if atom in ("^", "$", "\\A", "\\Z", "\\b", "\\B") else str(rng.choice(quants))
        parts.append(atom + q)
    return "".join(parts)


def test_linear_matcher_gives_python_answers():
    """On 1,500 random keys (classes, anchors, word boundaries, groups, alternation, greedy and
    lazy, bounded and unbounded repeats) and short names, the automaton and re.match agree,
    for the key alone and wrapped the way PEFT wraps it."""
    from intruder.io.pattern import LinearPattern

    rng = np.random.default_rng(1)
    alphabet = list("ab._0é \n")
    checked = 0
    for i in range(1500):
        key = _random_key(rng)
        pat = rf"(.*\.)?({key})$" if i % 2 else key
        try:
            rx = re.compile(pat)
        except re.error:
            continue
        lp = LinearPattern(pat)
        for _ in range(8):
            s = "".join(rng.choice(alphabet, size=rng.integers(0, 9)))
            assert lp.match(s) == bool(rx.match(s)), (pat, s)
            checked += 1
    assert checked > 8000


def test_ordinary_keys_select_as_peft_does():
    from intruder.io.pattern import peft_key_pattern

    names = [f"model.layers.{i}.{m}" for i in (0, 1, 10, 11)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj")]
    names += ["lm_head", "model.embed_tokens", "transformer.h.0.attn.c_attn"]
    keys = ["q_proj", "k_proj", "layers.1.self_attn.q_proj", r"layers\.1\d?\..*", "^model.*up_proj",
            "mlp.(down|up)_proj", "c_attn", "attn", "proj", ".*", r"layers\.0\.self_attn\.q_proj",
            "model.layers.1.mlp.up_proj", r"\d+\.mlp", "embed_tokens|lm_head"]
    for key in keys:
        p = peft_key_pattern(key)
        for n in names:
            assert p.match(n) == bool(re.match(rf"(.*\.)?({key})$", n)), (key, n)


@pytest.mark.parametrize("key,why", [(r"(q)\1", "back-references"), ("(?!k)q_proj", "look-ahead"),
                                     ("(?>q)_proj", "atomic"), ("q_proj++", "possessive"),
                                     ("(?i:Q_PROJ)", "inline flags"),
                                     ("(" + "x" * 3000 + ")", "longer"),
                                     ("((a{50}){50}){50}", "automaton states")])
def test_keys_without_a_linear_match_are_refused(key, why, tmp_path):
    d = hc.write_adapter(str(tmp_path / "a"), config=hc.lora_config(rank_pattern={key: 4}))
    with pytest.raises(AdapterError, match=f"rank_pattern key .* refused: .*{why}"):
        open_checkpoint(d)


def _reference_first(keys, name):
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def test_key_table_picks_the_first_key_as_peft_does():
    """Plain keys (looked up by length and dot positions, '.' a wildcard) mixed with regular
    expressions: the chosen key is PEFT's first match in config order, also for names holding
    a line break."""
    from intruder.io.pattern import KeyTable

    rng = np.random.default_rng(2)
    parts = ["model", "layers", "0", "1", "12", "q_proj", "k_proj", "mlp", "up_proj", "a", "b_c"]
    specials = ["q_proj", "layers.1.q_proj", "layers_1.q_proj", "0.q", "1.b_c", "mlp.up_proj",
                "layers.1.mlp", "r.up", ".*proj", "(q|k)_proj", "layers\\.1\\d*\\..*", "a", ".",
                "...", "model.layers.0.q_proj", "up_proj|mlp", "x"]
    for _ in range(300):
        names = [".".join(rng.choice(parts, size=rng.integers(1, 6))) for _ in range(10)]
        names += [names[0] + "\n", "q\nq_proj", names[1].replace(".", "_")]
        keys = list(dict.fromkeys(rng.choice(specials, size=rng.integers(1, 8))))
        keys += list(dict.fromkeys(rng.choice(names[:10], size=3)))  # whole names as plain keys
        keys = list(dict.fromkeys(keys))
        table = KeyTable(keys)
        for n in names:
            assert table.first(n) == _reference_first(keys, n), (keys, n)


def test_key_table_with_50k_plain_keys_is_fast():
    """A tool-written config: one plain key per module of a large MoE model."""
    import time

    from intruder.io.pattern import KeyTable

    names = [f"model.layers.{i}.mlp.experts.{e}.{m}" for i in range(60) for e in range(280)
             for m in ("gate_proj", "up_proj", "down_proj")][:50_000]
    keys = names[::-1] + ["(.*.*)*X"]
    t0 = time.perf_counter()
    table = KeyTable(keys)
    picked = [table.first(n) for n in names[:5000]]
    assert picked == names[:5000]
    assert table.first("lm_head") is None
    assert time.perf_counter() - t0 < 30  # keys x modules LinearPattern runs: hours
