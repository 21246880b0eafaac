"""Linear-time matching of the regular expressions in adapter_config.json.

PEFT picks a module's rank and alpha with `re.match(rf"(.*\\.)?({key})$", module)` for each key
of `rank_pattern` / `alpha_pattern`. Python's backtracking engine takes exponential time on keys
such as `(.*.*)*X`, and a config file is a stranger's input. Here the same pattern is parsed with
Python's own parser and run as a Thompson automaton, turned into a DFA lazily (each state set and
each transition computed once): time linear in the module name whatever the key, and the answer
is Python's for every construct a regular language has (literals, classes, `.`, groups,
alternation, greedy and lazy repeats, `^ $ \\A \\Z \\b \\B`). Back-references, look-around,
conditionals, atomic groups, possessive repeats and the flags i, m, a, L are refused: they are
either not regular or change what the construct means, and no PEFT key needs them.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, cast

if sys.version_info >= (3, 11):
    from re import _constants as _c  # type: ignore[attr-defined]  # not in typeshed
    from re import _parser as _p  # type: ignore[attr-defined]  # not in typeshed
else:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _p

MAX_STATES = 20_000  # automaton size (bounded repeats are unrolled)
MAX_KEY = 2_000  # characters in one key
_CACHE_LIMIT = 100_000  # memoised DFA entries per pattern before they are dropped

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)


class PatternError(ValueError):
    """The key cannot be matched in linear time (or is not a regular expression)."""


def _op(op) -> str:
    return getattr(op, "name", str(op))


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # sre's Unicode \w


_CATEGORY: dict[str, Callable[[str], bool]] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_NOT_DIGIT": lambda ch: not ch.isdecimal(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda ch: not ch.isspace(),
    "CATEGORY_WORD": _is_word,
    "CATEGORY_NOT_WORD": lambda ch: not _is_word(ch),
}


_UNSUPPORTED = {"GROUPREF": "back-references", "GROUPREF_EXISTS": "conditional groups",
                "ASSERT": "look-ahead and look-behind assertions",
                "ASSERT_NOT": "negative look-ahead and look-behind assertions",
                "ATOMIC_GROUP": "atomic groups", "POSSESSIVE_REPEAT": "possessive repeats"}


class _Builder:
    """Thompson construction, continuation style: build(items, next) returns the start state."""

    def __init__(self, dotall: bool):
        self.kind: list[int] = []
        self.data: list[object] = []
        self.outs: list[list[int]] = []
        self.dotall = dotall

    def new(self, kind: int, data=None, outs=None) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternError(f"expands to more than {MAX_STATES} automaton states")
        self.kind.append(kind)
        self.data.append(data)
        self.outs.append(list(outs or []))
        return len(self.kind) - 1

    def seq(self, items, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.item(_op(op), av, nxt)
        return nxt

    def item(self, op: str, av, nxt: int) -> int:
        if op == "LITERAL":
            ch = chr(av)
            return self.new(_CHAR, lambda c, ch=ch: c == ch, [nxt])
        if op == "NOT_LITERAL":
            ch = chr(av)
            return self.new(_CHAR, lambda c, ch=ch: c != ch, [nxt])
        if op == "ANY":
            return self.new(_CHAR, (lambda c: True) if self.dotall else (lambda c: c != "\n"),
                            [nxt])
        if op == "IN":
            return self.new(_CHAR, _charset(av), [nxt])
        if op == "BRANCH":
            return self.new(_SPLIT, None, [self.seq(alt, nxt) for alt in av[1]])
        if op == "SUBPATTERN":
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError("inline flags inside a group are not supported")
            return self.seq(sub, nxt)
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same set of matches
            lo, hi, sub = av
            unbounded = hi == _c.MAXREPEAT
            cur = nxt
            if unbounded:
                loop = self.new(_SPLIT)
                before = len(self.kind)
                body = self.seq(sub, loop)
                self.outs[loop] = [body, nxt] if len(self.kind) > before else [nxt]
                cur = loop
            else:
                for _ in range(hi - lo):
                    before = len(self.kind)
                    body = self.seq(sub, cur)
                    if len(self.kind) == before:  # an empty body: x{0,n} of nothing
                        break
                    cur = self.new(_SPLIT, None, [body, nxt])
            for _ in range(lo):
                before = len(self.kind)
                cur = self.seq(sub, cur)
                if len(self.kind) == before:
                    break
            return cur
        if op == "AT":
            return self.new(_ASSERT, _op(av), [nxt])
        raise PatternError(f"{_UNSUPPORTED.get(op, op.lower().replace('_', ' '))} "
                           f"are not supported")


def _charset(items) -> Callable[[str], bool]:
    negate = False
    chars = set()
    ranges: list[tuple[int, int]] = []
    cats: list[Callable[[str], bool]] = []
    for op, av in items:
        name = _op(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            chars.add(chr(av))
        elif name == "RANGE":
            ranges.append((av[0], av[1]))
        elif name == "CATEGORY":
            fn = _CATEGORY.get(_op(av))
            if fn is None:
                raise PatternError(f"character class {_op(av)} is not supported")
            cats.append(fn)
        else:
            raise PatternError(f"{name.lower()} in a character set is not supported")

    def pred(c: str) -> bool:
        o = ord(c)
        hit = c in chars or any(a <= o <= b for a, b in ranges) or any(f(c) for f in cats)
        return hit != negate

    return pred


class LinearPattern:
    """`LinearPattern(p).match(s)` is `re.match(p, s) is not None`, in time linear in len(s)."""

    def __init__(self, pattern: str):
        if len(pattern) > MAX_KEY:
            raise PatternError(f"longer than {MAX_KEY} characters")
        try:
            parsed = _p.parse(pattern, 0)
        except (re.error, RecursionError, OverflowError) as exc:
            raise PatternError(f"not a valid regular expression ({exc})") from exc
        except Exception as exc:  # the private parser's other failures
            raise PatternError(f"not a valid regular expression ({exc.__class__.__name__})") from exc
        flags = parsed.state.flags
        bad = flags & (re.IGNORECASE | re.MULTILINE | re.ASCII | re.LOCALE)
        if bad:
            raise PatternError(f"flag {re.RegexFlag(bad)!r} is not supported")
        b = _Builder(dotall=bool(flags & re.DOTALL))
        try:
            self.start = b.seq(parsed, b.new(_MATCH))
        except RecursionError:
            raise PatternError("nested too deeply") from None
        self.kind, self.data, self.outs = b.kind, b.data, b.outs
        self._closure: dict[tuple[frozenset[int], tuple[bool, ...]], frozenset[int]] = {}
        self._step: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def _assert(self, at: str, ctx: tuple[bool, ...]) -> bool:
        first, last, before_final_newline, prev_word, next_word, empty = ctx
        if at in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
            return first  # re.match starts at 0; without MULTILINE ^ is \A
        if at == "AT_END":
            return last or before_final_newline
        if at == "AT_END_STRING":
            return last
        if at == "AT_BOUNDARY":
            return not empty and prev_word != next_word
        if at == "AT_NON_BOUNDARY":
            return not empty and prev_word == next_word
        raise PatternError(f"assertion {at} is not supported")  # pragma: no cover

    def _close(self, states: frozenset[int], ctx) -> frozenset[int]:
        key = (states, ctx)
        got = self._closure.get(key)
        if got is not None:
            return got
        seen = set(states)
        stack = list(states)
        while stack:
            s = stack.pop()
            k = self.kind[s]
            if k == _SPLIT or (k == _ASSERT and self._assert(cast(str, self.data[s]), ctx)):
                for t in self.outs[s]:
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
        got = frozenset(s for s in seen if self.kind[s] in (_CHAR, _MATCH))
        if len(self._closure) > _CACHE_LIMIT:
            self._closure.clear()
        self._closure[key] = got
        return got

    def _advance(self, states: frozenset[int], ch: str) -> frozenset[int]:
        key = (states, ch)
        got = self._step.get(key)
        if got is None:
            got = frozenset(self.outs[s][0] for s in states
                            if self.kind[s] == _CHAR
                            and cast(Callable[[str], bool], self.data[s])(ch))
            if len(self._step) > _CACHE_LIMIT:
                self._step.clear()
            self._step[key] = got
        return got

    def match(self, text: str) -> bool:
        n = len(text)
        states = frozenset((self.start,))
        for pos in range(n + 1):
            ctx = (pos == 0, pos == n, pos == n - 1 and text[-1] == "\n",
                   pos > 0 and _is_word(text[pos - 1]), pos < n and _is_word(text[pos]), n == 0)
            closed = self._close(states, ctx)
            if any(self.kind[s] == _MATCH for s in closed):
                return True
            if pos == n:
                return False
            states = self._advance(closed, text[pos])
            if not states:
                return False
        return False  # pragma: no cover


def peft_key_pattern(key: str) -> LinearPattern:
    """The matcher PEFT uses for one rank_pattern / alpha_pattern key."""
    return LinearPattern(rf"(.*\.)?({key})$")


_PLAIN = re.compile(r"[A-Za-z0-9_.]+")  # letters, digits, _ are literal; '.' is any character


class KeyTable:
    """The first key (in config order) whose PEFT pattern matches a module name.

    Configs written by tools (EVA, AdaLoRA conversions) hold one plain key per module, thousands
    of them; trying each in turn would cost keys x modules matches. A plain key (letters, digits,
    `_` and `.`) has a fixed length L and matches exactly when the name's last L characters fit it
    ('.' fitting any character) and are the whole name or follow a '.': so plain keys are looked
    up by length and by where their dots are, a handful of dict lookups per name. Other keys run
    through LinearPattern in order. A name holding a line break (where `$` and `.` differ) takes
    the plain path through LinearPattern too.
    """

    def __init__(self, keys, compile_other: Callable[[str], LinearPattern] | None = None):
        compile_other = compile_other or peft_key_pattern
        self.keys: list[str] = list(keys)
        self.other: list[tuple[int, LinearPattern]] = []
        # (length, slices between the dots) -> {the key's characters outside its dots: index}
        self.plain: dict[tuple[int, tuple[tuple[int, int], ...]], dict[str, int]] = {}
        self._plain_patterns: list[tuple[int, LinearPattern]] | None = None
        for i, k in enumerate(self.keys):
            if _PLAIN.fullmatch(k):
                cuts, start = [], 0
                for j, ch in enumerate(k):
                    if ch == ".":
                        cuts.append((start, j))
                        start = j + 1
                cuts.append((start, len(k)))
                cuts_t = tuple(cuts)
                proj = "".join(k[a:b] for a, b in cuts_t)
                self.plain.setdefault((len(k), cuts_t), {}).setdefault(proj, i)
            else:
                self.other.append((i, compile_other(k)))

    def first(self, name: str) -> str | None:
        best: int | None = None
        if "\n" in name:
            if self._plain_patterns is None:
                self._plain_patterns = [(i, peft_key_pattern(k)) for i, k in enumerate(self.keys)
                                        if _PLAIN.fullmatch(k)]
            for i, pat in self._plain_patterns:
                if pat.match(name):
                    best = i
                    break
        else:
            n = len(name)
            for (length, cuts), table in self.plain.items():
                if length > n or (length < n and name[n - length - 1] != "."):
                    continue
                tail = name[n - length:]
                hit = table.get("".join(tail[a:b] for a, b in cuts))
                if hit is not None and (best is None or hit < best):
                    best = hit
        for i, pat in self.other:
            if best is not None and i > best:
                break
            if pat.match(name):
                best = i
                break
        return None if best is None else self.keys[best]
