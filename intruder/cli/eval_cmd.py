"""`intruder eval`: perplexity and task accuracy of one model (a thin wrapper over the library)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import click

from .. import __version__
from ..evaluate import check_evaluators, get_evaluator, load_model, run_evaluators
from ..types import EvalResult
from . import cli
from .common import echo_err, emit, handle_errors
from .hubopts import offline_option, resolve_model
from .options import quiet_option

_DEVICES = ("auto", "cpu", "cuda")


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    v = (value or "auto").lower()
    if v in _DEVICES or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise click.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")


@cli.command("eval")
@click.argument("model", type=click.Path(readable=False))
@click.option("--eval", "specs", multiple=True, default=("wikitext",), show_default=True,
              metavar="SPEC", help="Evaluator: wikitext[:PATH] (wiki.test.raw; lm-eval's metrics), "
              "wikitext-sliding[:PATH] (adds the stride-512 token perplexity, about 8x the cost), "
              "task:PATH (.json multiple choice, .txt held-out text), lm-eval:TASK[,TASK...] "
              "(lm-evaluation-harness tasks). Repeatable.")
@click.option("--lm-eval-include", "lm_eval_include", multiple=True,
              type=click.Path(exists=True), metavar="DIR",
              help="Folder (or YAML file) of lm-eval task configs for --eval lm-eval:TASK.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N documents / items / lines of each evaluator.")
@click.option("--model-config", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory with config.json and tokenizer, for a bare .safetensors MODEL.")
@click.option("--device", default="auto", show_default=True, callback=_device,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True,
              help="auto: float32 on CPU, the checkpoint's dtype on CUDA.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per window (default: the model's context length).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@quiet_option
@offline_option
@handle_errors
def eval_cmd(model: str, specs: tuple[str, ...], lm_eval_include: tuple[str, ...],
             limit: int | None, model_config: str | None, device: str, dtype: str,
             max_length: int | None, as_json: bool, quiet: bool) -> None:
    """Evaluate MODEL (HF directory, .safetensors file, or hub ID org/name[@revision]) on
    WikiText-2 and tasks.

    Every number names its protocol: `wikitext` gives lm-eval's word_perplexity,
    byte_perplexity and bits_per_byte; `wikitext-sliding` adds a sliding-window
    token_perplexity. WikiText data
    comes from wikitext:PATH, $INTRUDER_WIKITEXT (the wiki.test.raw file) or $INTRUDER_DATA_DIR
    (a folder holding wikitext-2-raw/wiki.test.raw).

    \b
    Examples:
      intruder eval model-dir/ --limit 5
      intruder eval scaled.safetensors --model-config base-dir/ --eval wikitext
      intruder eval model-dir/ --eval task:winogrande/test.json --json
    """
    opts = {"lm_eval_include": lm_eval_include} if lm_eval_include else {}
    evaluators = [get_evaluator(s, **opts) for s in specs]  # unknown names fail before loading
    check_evaluators(evaluators, limit)  # ... and so does missing or unreadable data
    model, source = resolve_model(model)
    echo_err(f"loading {model} ...", quiet)
    lm = load_model(model, model_config=model_config, device=device,
                    dtype=None if dtype == "auto" else dtype, max_length=max_length,
                    progress=not quiet)
    echo_err(f"model on {lm.device} ({lm.dtype}), max length {lm.max_length}", quiet)
    results = run_evaluators(lm, evaluators, limit=limit, progress=not quiet)
    if as_json:
        emit(json.dumps(dict(_json_doc(model, lm, limit, results), source=source), indent=2))
    else:
        emit(format_table(results))


def _json_doc(model: str, lm: Any, limit: int | None,
              results: Sequence[EvalResult]) -> dict[str, Any]:
    rows = []
    for r in results:
        d = asdict(r)
        d["extra"] = {k: v for k, v in r.extra}
        d["value"] = r.value if math.isfinite(r.value) else str(r.value)
        rows.append(d)
    return {"model": str(model), "device": lm.device, "dtype": lm.dtype,
            "max_length": lm.max_length, "limit": limit, "tool_version": __version__,
            "results": rows}


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4e}"


def _noun(unit: str) -> str:
    """What n counts, from the unit text: 'words (original ...); perplexity per word' -> 'words'."""
    return unit.split(";")[0].split("(")[0].split()[0] if unit.strip() else ""


def format_table(results: Sequence[EvalResult]) -> str:
    """Plain-text table: evaluator, metric, value, n (with its unit), protocol."""
    head = ("evaluator", "metric", "value", "n", "protocol")
    rows = [(r.evaluator, r.metric, _fmt(r.value), f"{r.n_units} {_noun(r.unit)}", r.protocol)
            for r in results]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(4)]
    lines = []
    for x in [head] + rows:
        lines.append("  ".join([x[0].ljust(widths[0]), x[1].ljust(widths[1]), x[2].rjust(widths[2]),
                                x[3].rjust(widths[3]), x[4]]))
    return "\n".join(lines)
