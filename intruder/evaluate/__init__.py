"""Evaluators: WikiText-2 perplexity (lm-eval protocol) and task accuracy / held-out loss.

Specs name an evaluator and optionally its data: `wikitext`, `wikitext:PATH`,
`wikitext-sliding[:PATH]` (adds the 8x dearer sliding-window token perplexity), `task:PATH`,
`lm-eval:TASK[,TASK...]` (lm-evaluation-harness tasks on the loaded model). Each evaluator has
`.name`, `.evaluate(lm, limit=None, progress=True) -> list[EvalResult]`, where `lm` is a
LoadedModel from `load_model`, and `.check(limit)`, which finds and reads its data (sweeps call
it before any model work). Library entry point for other commands:

    results = evaluate_model("out/model.safetensors", ["wikitext"], model_config="base-dir/")

Heavy imports (torch, transformers) happen only when a model is loaded or scored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any, Callable, Protocol

from ..errors import EvalError
from ..types import EvalResult
from .lmeval import LmEvalEvaluator
from .model import LoadedModel
from .model import load_model as _load
from .task import TaskEvaluator
from .wikitext import DEFAULT_STRIDE, WikitextEvaluator

__all__ = ["EVALUATORS", "EvalResult", "available", "check_evaluators", "evaluate_model",
           "get_evaluator", "load_model", "register", "run_evaluators"]


class Evaluator(Protocol):
    """What running an evaluator needs of it (`check(limit) -> str` is optional)."""

    @property
    def name(self) -> str: ...

    def evaluate(self, lm: Any, limit: int | None = None,
                 progress: bool = True) -> list[EvalResult]: ...


def _wikitext(arg: str | None):
    return WikitextEvaluator(path=arg or None)


def _wikitext_sliding(arg: str | None):
    return WikitextEvaluator(path=arg or None, stride=DEFAULT_STRIDE)


def _lm_eval(arg: str | None, lm_eval_include: Sequence[str] = (), **_):
    return LmEvalEvaluator(arg or "", include=lm_eval_include)


def _task(arg: str | None):
    if not arg:
        raise EvalError("the task evaluator needs a file: task:PATH (a .json multiple-choice file "
                        "or a .txt held-out text)")
    return TaskEvaluator(arg)


# name -> (factory(arg or None) -> evaluator, usage shown in messages)
EVALUATORS: dict[str, tuple] = {
    "wikitext": (_wikitext, "wikitext[:PATH]"),
    # plus token_perplexity from the stride-512 sliding pass (about max_length/512 x the cost)
    "wikitext-sliding": (_wikitext_sliding, "wikitext-sliding[:PATH]"),
    "task": (_task, "task:PATH"),
    "lm-eval": (_lm_eval, "lm-eval:TASK[,TASK...]"),
}


def register(name: str, factory: Callable[[str | None], object], usage: str = "") -> None:
    """Add an evaluator: `factory(arg)` gets the text after 'name:' (or None)."""
    EVALUATORS[name] = (factory, usage or name)


def available() -> list[str]:
    """Usage strings of every registered evaluator, e.g. ['wikitext[:PATH]', 'task:PATH']."""
    return [usage for _, usage in EVALUATORS.values()]


def get_evaluator(spec: str, **options):
    """Build the evaluator a spec names: 'wikitext', 'wikitext:PATH', 'task:PATH',
    'lm-eval:hellaswag,arc_easy' ... `options` go to factories that take them
    (lm_eval_include: folders of lm-eval task YAML files)."""
    spec = (spec or "").strip()
    name, sep, arg = spec.partition(":")
    key = name.strip().lower()
    key = key if key in EVALUATORS else _ALIASES.get(key, key)
    if key not in EVALUATORS:
        close = difflib.get_close_matches(key, list(EVALUATORS), n=1, cutoff=0.5)
        msg = f"unknown evaluator {name!r}"
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise EvalError(f"{msg} (available: {', '.join(available())})")
    factory, _ = EVALUATORS[key]
    return factory(arg.strip() if sep else None, **_accepted(factory, options))


_ALIASES = {"wikitext-lmeval": "wikitext"}  # earlier name of the lm-eval metrics alone


def _accepted(factory, options: dict) -> dict:
    """The options a factory takes (registered factories may take none)."""
    if not options:
        return {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def check_evaluators(evaluators: Sequence[Evaluator], limit: int | None = None) -> list[str]:
    """Find and read every evaluator's data now; one line per evaluator saying what it will
    score. A missing or unreadable file fails here, before any model is rescaled or loaded."""
    return [ev.check(limit) if hasattr(ev, "check") else ev.name for ev in evaluators]


def load_model(path, model_config=None, device: str = "auto", dtype=None, max_length=None,
               progress: bool = True, device_map: str | None = None):
    """Load a model for evaluation; see intruder.evaluate.model.load_model."""
    return _load(path, model_config=model_config, device=device, dtype=dtype,
                 max_length=max_length, progress=progress, device_map=device_map)


def run_evaluators(lm, evaluators: Sequence[str | Evaluator], limit: int | None = None,
                   progress: bool = True) -> list[EvalResult]:
    """Run evaluators (specs or objects) on an already loaded model, in order."""
    objs = [get_evaluator(e) if isinstance(e, str) else e for e in evaluators]
    results: list[EvalResult] = []
    for ev in objs:
        results.extend(ev.evaluate(lm, limit=limit, progress=progress))
    return results


def evaluate_model(path, specs: Sequence[str | Evaluator] = ("wikitext",), *,
                   model_config=None, device: str = "auto", dtype=None,
                   max_length: int | None = None, limit: int | None = None,
                   progress: bool = True) -> list[EvalResult]:
    """Load MODEL once and run every evaluator on it.

    Args:
        path: HF model dir, weights dir or .safetensors file; or an already LoadedModel.
        specs: evaluator specs ('wikitext', 'task:PATH', ...) or evaluator objects. They are all
            built before the model loads, so a typo fails fast.
        model_config: dir with config.json + tokenizer, for paths that lack them.
        limit: first N documents / items / lines per evaluator.
    """
    if isinstance(specs, str):
        specs = [specs]
    evaluators = [get_evaluator(s) if isinstance(s, str) else s for s in specs]
    lm = path if isinstance(path, LoadedModel) else load_model(
        path, model_config=model_config, device=device, dtype=dtype, max_length=max_length,
        progress=progress)
    return run_evaluators(lm, evaluators, limit=limit, progress=progress)
