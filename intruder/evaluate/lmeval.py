"""`--eval lm-eval:TASK[,TASK...]`: lm-evaluation-harness tasks run on the model already loaded.

The loaded model (and its tokenizer) is handed to lm-eval as `HFLM(pretrained=model)` and scored
with `simple_evaluate`, so any task lm-eval knows works: hellaswag, arc_easy, mmlu, or a user's
own task YAML from a folder given as `--lm-eval-include DIR` (lm-eval's `include_path`; a local
dataset is `dataset_path: json` with `data_files`). Every number lm-eval reports for a
requested task (group tasks: the group's aggregate) becomes one EvalResult named
`lm-eval:TASK`, metric `acc`, `acc_norm`, ... (`acc[flexible-extract]` for a filter other than
`none`), with lm-eval's version, the task version, the shot count and the document count.

lm-eval is an optional dependency, imported only here and only when such a spec is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import EvalError
from ..types import EvalResult

DEFAULT_BATCH = 8
_MANAGERS: dict[tuple[str, ...], object] = {}  # include folders -> TaskManager (indexing is slow)


def _import():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvalError("--eval lm-eval:TASK needs lm-evaluation-harness: "
                        "pip install 'intruder[lmeval]'") from exc
    return lm_eval, TaskManager


class LmEvalEvaluator:
    """lm-evaluation-harness tasks; see the module docstring."""

    def __init__(self, tasks: str, include: Sequence[str] = (), num_fewshot: int | None = None,
                 batch_size: int | None = None):
        names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        if not names:
            raise EvalError("lm-eval needs task names: lm-eval:TASK[,TASK...] "
                            "(e.g. lm-eval:hellaswag,arc_easy)")
        self.tasks: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.include: tuple[str, ...] = tuple(str(p) for p in include or ())
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.name = "lm-eval:" + ",".join(self.tasks)
        self._manager = None

    def manager(self):
        if self._manager is None:
            import os

            for p in self.include:
                if not os.path.exists(p):
                    raise EvalError(f"--lm-eval-include {p}: no such file or folder")
            _, TaskManager = _import()
            key = tuple(os.path.abspath(p) for p in self.include)
            if key not in _MANAGERS:
                _MANAGERS[key] = TaskManager(include_path=list(self.include) or None)
            self._manager = _MANAGERS[key]
        return self._manager

    def check(self, limit: int | None = None) -> str:
        """Resolve every task and load its documents now (the dataset read, offline or not)."""
        import difflib

        tm = self.manager()
        known = set(tm.all_tasks)
        for t in self.tasks:
            if t not in known:
                close = difflib.get_close_matches(t, sorted(known), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f" (searched lm-eval's tasks and {', '.join(self.include)})" \
                    if self.include else " (a task YAML of your own: --lm-eval-include DIR)"
                raise EvalError(f"lm-eval has no task {t!r}{hint}{where}")
        counts = []
        for t in self.tasks:
            try:
                built = _build(tm, t)
            except Exception as exc:  # datasets: missing file, offline hub, bad YAML ...
                msg = str(exc).strip().splitlines()
                raise EvalError(f"lm-eval task {t!r}: cannot load its data "
                                f"({type(exc).__name__}: {msg[0] if msg else ''})") from exc
            leaves = list(built["tasks"].values()) if isinstance(built, dict) and \
                isinstance(built.get("tasks"), dict) else _leaves(built)
            n = sum(_n_docs(task) for task in leaves)
            counts.append(f"{t} ({min(n, limit) if limit else n} documents)")
        return f"{self.name}: " + ", ".join(counts)

    def evaluate(self, lm, limit: int | None = None, progress: bool = True) -> list[EvalResult]:
        """Run the tasks on `lm` (a LoadedModel) through lm-eval's simple_evaluate."""
        lm_eval, _ = _import()
        from lm_eval.models.huggingface import HFLM

        hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=lm.max_length,
                    batch_size=self.batch_size or DEFAULT_BATCH, backend="causal")
        try:
            out = lm_eval.simple_evaluate(model=hflm, tasks=list(self.tasks),
                                          task_manager=self.manager(), limit=limit,
                                          num_fewshot=self.num_fewshot, log_samples=False,
                                          verbosity="ERROR")
        except EvalError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            raise EvalError(f"lm-eval failed on {self.name}: {type(exc).__name__}: "
                            f"{msg[0] if msg else ''}") from exc
        return results_from_lm_eval(out, self.tasks, getattr(lm_eval, "__version__", "?"))


def _build(tm, task: str):
    """Build one task (or group) with its documents loaded."""
    if hasattr(tm, "load"):  # lm-eval >= 0.4.10
        return tm.load([task])
    from lm_eval.tasks import get_task_dict

    return get_task_dict([task], tm)


def _leaves(d) -> list:
    out = []
    for v in (d.values() if isinstance(d, dict) else [d]):
        if isinstance(v, dict):
            out.extend(_leaves(v))
        elif isinstance(v, list):
            out.extend(v)
        else:
            out.append(v)
    return out


def _n_docs(task) -> int:
    try:
        return len(task.eval_docs)
    except Exception:  # a group object or a task without documents
        return 0


def results_from_lm_eval(out: dict, tasks: Sequence[str], version: str) -> list[EvalResult]:
    """EvalResults from simple_evaluate's output, for the requested tasks (groups aggregated)."""
    res: dict[str, dict] = out.get("results") or {}
    n_samples = out.get("n-samples") or {}
    subtasks = out.get("group_subtasks") or {}
    results: list[EvalResult] = []
    for t in tasks:
        metrics = res.get(t)
        if metrics is None:
            raise EvalError(f"lm-eval returned no results for task {t!r} (a group without an "
                            f"aggregate metric? name its subtasks instead)")
        leaves = subtasks.get(t) or [t]
        n = sum(int((n_samples.get(s) or {}).get("effective", 0)) for s in leaves)
        shots = (out.get("n-shot") or {}).get(t, "?")
        tver = (out.get("versions") or {}).get(t, "?")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or isinstance(value, (str, bool)) or \
                    not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric}[{filt}]"
            protocol = (f"lm-evaluation-harness {version} simple_evaluate, task {t} (version "
                        f"{tver}), {shots}-shot, filter {filt}")
            extra: tuple[tuple[str, object], ...] = (("task", t), ("filter", filt))
            if isinstance(stderr, (int, float)) and math.isfinite(stderr):
                extra += (("stderr", float(stderr)),)
            results.append(EvalResult(
                evaluator=f"lm-eval:{t}", metric=name, value=float(value), n_units=n,
                unit=f"documents (lm-eval {t}); {metric} as lm-eval defines it", protocol=protocol,
                extra=extra))
    return results
