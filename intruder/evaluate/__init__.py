"""Evaluators: WikiText-2 perplexity (lm-eval protocol) and task accuracy / held-out loss.

Specs name an evaluator and optionally its data: `wikitext`, `wikitext:PATH`, `task:PATH`.
Each evaluator has `.name` and `.evaluate(lm, limit=None, progress=True) -> list[EvalResult]`,
where `lm` is a LoadedModel from `load_model`. Library entry point for other commands:

    results = evaluate_model("out/model.safetensors", ["wikitext"], model_config="base-dir/")

Heavy imports (torch, transformers) happen only when a model is loaded or scored.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Optional, Sequence, Union

from ..errors import EvalError
from ..types import EvalResult

__all__ = ["EVALUATORS", "EvalResult", "available", "evaluate_model", "get_evaluator",
           "load_model", "register", "run_evaluators"]


def _wikitext(arg: Optional[str]):
    from .wikitext import WikitextEvaluator

    return WikitextEvaluator(path=arg or None)


def _wikitext_lmeval(arg: Optional[str]):
    from .wikitext import WikitextEvaluator

    return WikitextEvaluator(path=arg or None, stride=None)


def _task(arg: Optional[str]):
    if not arg:
        raise EvalError("the task evaluator needs a file: task:PATH (a .json multiple-choice file "
                        "or a .txt held-out text)")
    from .task import TaskEvaluator

    return TaskEvaluator(arg)


# name -> (factory(arg or None) -> evaluator, usage shown in messages)
EVALUATORS: Dict[str, tuple] = {
    "wikitext": (_wikitext, "wikitext[:PATH]"),
    # the lm-eval metrics alone, without the sliding-window token perplexity (about 2x faster)
    "wikitext-lmeval": (_wikitext_lmeval, "wikitext-lmeval[:PATH]"),
    "task": (_task, "task:PATH"),
}


def register(name: str, factory: Callable[[Optional[str]], object], usage: str = "") -> None:
    """Add an evaluator: `factory(arg)` gets the text after 'name:' (or None)."""
    EVALUATORS[name] = (factory, usage or name)


def available() -> List[str]:
    """Usage strings of every registered evaluator, e.g. ['wikitext[:PATH]', 'task:PATH']."""
    return [usage for _, usage in EVALUATORS.values()]


def get_evaluator(spec: str):
    """Build the evaluator a spec names: 'wikitext', 'wikitext:PATH' or 'task:PATH'."""
    spec = (spec or "").strip()
    name, sep, arg = spec.partition(":")
    key = name.strip().lower()
    if key not in EVALUATORS:
        close = difflib.get_close_matches(key, list(EVALUATORS), n=1, cutoff=0.5)
        msg = f"unknown evaluator {name!r}"
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise EvalError(f"{msg} (available: {', '.join(available())})")
    factory, _ = EVALUATORS[key]
    return factory(arg.strip() if sep else None)


def load_model(path, model_config=None, device: str = "auto", dtype=None, max_length=None,
               progress: bool = True):
    """Load a model for evaluation; see intruder.evaluate.model.load_model."""
    from .model import load_model as _load

    return _load(path, model_config=model_config, device=device, dtype=dtype,
                 max_length=max_length, progress=progress)


def run_evaluators(lm, evaluators: Sequence[Union[str, object]], limit: Optional[int] = None,
                   progress: bool = True) -> List[EvalResult]:
    """Run evaluators (specs or objects) on an already loaded model, in order."""
    objs = [get_evaluator(e) if isinstance(e, str) else e for e in evaluators]
    results: List[EvalResult] = []
    for ev in objs:
        results.extend(ev.evaluate(lm, limit=limit, progress=progress))
    return results


def evaluate_model(path, specs: Sequence[Union[str, object]] = ("wikitext",), *,
                   model_config=None, device: str = "auto", dtype=None,
                   max_length: Optional[int] = None, limit: Optional[int] = None,
                   progress: bool = True) -> List[EvalResult]:
    """Load MODEL once and run every evaluator on it.

    Args:
        path: HF model dir, weights dir or .safetensors file; or an already LoadedModel.
        specs: evaluator specs ('wikitext', 'task:PATH', ...) or evaluator objects. They are all
            built before the model loads, so a typo fails fast.
        model_config: dir with config.json + tokenizer, for paths that lack them.
        limit: first N documents / items / lines per evaluator.
    """
    from .model import LoadedModel

    if isinstance(specs, str):
        specs = [specs]
    evaluators = [get_evaluator(s) if isinstance(s, str) else s for s in specs]
    lm = path if isinstance(path, LoadedModel) else load_model(
        path, model_config=model_config, device=device, dtype=dtype, max_length=max_length,
        progress=progress)
    return run_evaluators(lm, evaluators, limit=limit, progress=progress)
