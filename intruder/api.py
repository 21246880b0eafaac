"""The Python API: scan, compare, track, rescale and evaluate from a script or a notebook.

Every input may be a path (file, model or adapter directory), a hub ID (where the checkpoint
layer resolves them), a `{name: tensor}` state dict, a `torch.nn.Module` (transformers or plain)
or a PEFT model (merged per tensor exactly as its saved adapter directory would be). Keyword
names and defaults are the command line's options (`--top-k` -> `top_k=`).

    import intruder
    r = intruder.scan(base_model, peft_model)        # or paths, hub IDs, state dicts
    r.verdict.wording       # 'LoRA-like update (rank 8): 83 intruders at epsilon 0.5 in ...'
    r.to_dataframe()        # one row per matrix, every per-matrix field of the JSON
    r.save("scan.json"); intruder.load_report("scan.json") == r
    model = intruder.rescale(peft_model, r, 0.5)     # a rescaled copy, in memory

The examples in the docstrings below run in the tests (tests/test_api.py, from the checkout's
root, on the bundled demo models); notebooks/ holds longer ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InputError, ReportError
from .evaluate import evaluate_model
from .evaluate.model import LoadedModel, context_length, resolve_device
from .inplace import rescaled_copy
from .io.atomic import check_output, write_text
from .io.jsonfile import read_json
from .io.memory import as_checkpoint
from .report import frame, track_view
from .report import schema as _schema
from .report.html import escape, write_html
from .report.scale_results import check_format, parse_scale_results
from .report.similarity import recompute_similarity
from .report.summary import summary as _summary
from .report.verdict import decide, verdict_of, verdict_text
from .report.views import most_affected
from .run.cache import default_cache_dir
from .scan import run_scan
from .track import Persistence, TrackEntry, TrackReport, run_compare, run_track, summaries
from .track import dumps as track_dumps
from .track import to_dict as track_to_dict
from .types import DEFAULT_EPSILONS, DEFAULT_TOP_K, EvalResult, ScanConfig, ScanReport, Verdict

Source = Any  # str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module | PeftModel
_KINDS = ("a path, a hub ID, a {name: tensor} state dict, a torch.nn.Module or a PEFT model")


# ------------------------------------------------------------------------------------ results


@dataclasses.dataclass(frozen=True, repr=False, eq=True)
class ScanResult(ScanReport):
    """A scan report with the methods a notebook wants. Everything of ScanReport (`layers`,
    `config`, `base`, `tuned`, `warnings` ...) is there; `verdict` is always set."""

    @property
    def summary(self) -> dict:
        """The report's summary block: counts per epsilon, margin, update shape (provenance)."""
        return _summary(self)

    def to_dataframe(self, per: str = "matrix"):
        """pandas DataFrame: one row per matrix (default; every per-matrix field of the JSON),
        per intruder (`per="intruder"`) or per top-k tuned vector (`per="vector"`)."""
        views = {"matrix": frame.to_dataframe, "intruder": frame.intruders_dataframe,
                 "vector": frame.vectors_dataframe}
        if per not in views:
            raise InputError(f"per={per!r}: use 'matrix', 'intruder' or 'vector'")
        return views[per](self)

    def to_dict(self) -> dict:
        """The JSON document (schema intruder.report.schema.SCHEMA)."""
        return _schema.to_dict(self)

    def to_json(self) -> str:
        return _schema.dumps(self)

    def save(self, path) -> str:
        """Write the JSON report atomically (a reader never sees half a file); returns the path.
        Refused (OutputError): a path that is one of the scanned checkpoints or inside one, a
        link, FIFO or device (intruder.io.targets)."""
        check_output(os.fspath(path), [self.base.path, self.tuned.path], "report")
        _schema.save_report(self, os.fspath(path))
        return os.fspath(path)

    def to_html(self, path, **options):
        """Write the self-contained HTML audit (intruder.report.html.write_html options:
        scale_results=, similarity=, base_path=, tuned_path=); returns its AuditInfo."""
        check_output(os.fspath(path), [self.base.path, self.tuned.path], "HTML audit")
        return write_html(self, os.fspath(path), **options)

    def similarity(self, names: Sequence[str] | None = None, n: int = 1) -> dict[str, Any]:
        """|cos| of the top-k tuned against the top-2k base singular vectors (the paper's
        Figure 1) for `names` (default: the n most affected matrices), recomputed from the
        checkpoints after checking they are the scanned ones; draw with
        intruder.plots.similarity_heatmaps(list(blocks.values()))."""
        names = list(names) if names is not None else [l.name for l in most_affected(self, n)]
        return recompute_similarity(self, names)

    def __repr__(self) -> str:
        return (f"<ScanResult {self.tuned.path!r} vs {self.base.path!r}: "
                f"{_verdict(self).wording}>")

    def _repr_html_(self) -> str:
        return (f"<p><b>{escape(_verdict(self).wording)}</b><br><small>{escape(self.tuned.path)} "
                f"against {escape(self.base.path)}; {len(self.layers)} matrices; "
                f"r.to_dataframe(), r.to_html(path)</small></p>")


def _verdict(report: ScanReport) -> Verdict:
    """The verdict a result carries (_result always sets it), else a fresh one."""
    return report.verdict if report.verdict is not None else verdict_of(report)


def _result(report: ScanReport, roundings: int = 1) -> ScanResult:
    """A ScanReport as a ScanResult with its verdict (computed once when missing)."""
    if isinstance(report, ScanResult) and report.verdict is not None:
        return report
    kw = {f.name: getattr(report, f.name) for f in dataclasses.fields(ScanReport)}
    if kw["verdict"] is None or roundings != 1:
        kw["verdict"] = decide(report, roundings)
    return ScanResult(**kw)


@dataclasses.dataclass(frozen=True, repr=False)
class TrackResult(TrackReport):
    """A compare (independent fine-tunes of one base) or track (sequential steps) result.
    `results[label]` or `results[i]` is a checkpoint's ScanResult against the base."""

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    @property
    def verdicts(self) -> dict[str, Verdict]:
        """Each checkpoint's verdict against the base (a track's step i counts i roundings)."""
        return {e.label: _verdict(e.vs_base) for e in self.entries}

    @property
    def summary(self) -> list[dict]:
        """One row per checkpoint, as in the JSON (`entries[i].summary`)."""
        return summaries(self)

    def __getitem__(self, key: int | str) -> ScanResult:
        if isinstance(key, int):
            return _result(self.entries[key].vs_base)
        for e in self.entries:
            if e.label == key:
                return _result(e.vs_base)
        raise KeyError(f"no checkpoint labelled {key!r} (labels: {', '.join(self.labels)})")

    def __len__(self) -> int:
        return len(self.entries)

    def to_dataframe(self):
        """One row per checkpoint: intruders per epsilon, margin, novel strength, the verdict."""
        import pandas as pd

        rows = []
        for e, s in zip(self.entries, self.summary):
            v = e.vs_base.verdict
            row = {"label": e.label, "path": e.path, "kind": s["kind"],
                   "intruders": s["intruders"], "layers_with_intruders": s["layers_with_intruders"],
                   "layers_scanned": s["layers_scanned"], "min_max_cos": s["min_max_cos"],
                   "novel_strength_max": s["novel_strength_max"],
                   "verdict": v.label, "confidence": v.confidence,
                   "estimated_rank": v.estimated_rank, "wording": v.wording}
            for k, n in s["counts_by_epsilon"].items():
                row[f"count@{k}"] = n
            for k in ("persistent", "new", "gone"):
                if k in s:
                    row[k] = s[k]
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return track_to_dict(self)

    def figure(self, kind: str = "counts"):
        """A matplotlib Figure of the track / compare page: 'counts' (intruders per checkpoint),
        'margin' (lowest max|cos| and novel strength) or 'persistence' (a track's persistent /
        new / gone intruders)."""
        figs = {"counts": track_view.track_counts, "margin": track_view.track_margin,
                "persistence": track_view.persistence_bars}
        if kind not in figs:
            raise InputError(f"kind={kind!r}: use {', '.join(map(repr, figs))}")
        return figs[kind](self)

    def save(self, path) -> str:
        """Write the JSON document atomically; returns the path."""
        check_output(os.fspath(path), self._inputs(), "document")
        write_text(os.fspath(path), track_dumps(self) + "\n")
        return os.fspath(path)

    def to_html(self, path) -> int:
        """Write the self-contained track / compare page; returns its size in bytes."""
        check_output(os.fspath(path), self._inputs(), "HTML page")
        return track_view.write_track_html(self, os.fspath(path))

    def _inputs(self) -> list[str]:
        return [self.base.path] + [e.path for e in self.entries]

    def __repr__(self) -> str:
        lines = [f"<TrackResult {self.mode} of {len(self.entries)} against {self.base.path!r}:"]
        lines += [f"  {e.label}: {_verdict(e.vs_base).wording}" for e in self.entries]
        return "\n".join(lines) + ">"


def _track_result(tr: TrackReport) -> TrackResult:
    entries = tuple(dataclasses.replace(
        e, vs_base=_result(e.vs_base, i if tr.mode == "track" else 1),
        vs_previous=_result(e.vs_previous) if e.vs_previous is not None else None)
        for i, e in enumerate(tr.entries, 1))
    kw = {f.name: getattr(tr, f.name) for f in dataclasses.fields(TrackReport)}
    kw["entries"] = entries
    return TrackResult(**kw)


# ------------------------------------------------------------------------------------- inputs


def _config(top_k, epsilon, vectors, include, exclude, device, cache_dir, no_cache,
            allow_nonfinite, default_eps=DEFAULT_EPSILONS) -> ScanConfig:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise InputError(f"top_k must be a whole number, got {top_k!r}")
    eps = _epsilons(epsilon, default_eps)
    for name, v in (("vectors", vectors), ("device", device)):
        if not isinstance(v, str):
            raise InputError(f"{name} must be a string, got {type(v).__name__}")
    for name, v in (("include", include), ("exclude", exclude), ("cache_dir", cache_dir)):
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise InputError(f"{name} must be a string or None, got {type(v).__name__}")
    if not no_cache and cache_dir is None:
        cache_dir = default_cache_dir()
    return ScanConfig(top_k=top_k, epsilons=eps, vectors=vectors, include=include, exclude=exclude,
                      device=device, allow_nonfinite=bool(allow_nonfinite),
                      cache_dir=None if no_cache else os.fspath(cache_dir))


def _epsilons(epsilon, default) -> tuple[float, ...]:
    """0.5, (0.5, 0.7), [0.3, 0.5] or '0.3,0.5' (the CLI's form); the first decides."""
    if epsilon is None:
        return tuple(default)
    parts: list[Any]  # user values, checked by float() below
    if isinstance(epsilon, str):
        parts = [p.strip() for p in epsilon.split(",") if p.strip()]
    elif isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool):
        parts = [epsilon]
    elif isinstance(epsilon, Sequence) and epsilon:
        parts = list(epsilon)
    else:
        raise InputError(f"epsilon must be a number, a list of numbers or 'A,B,...', got "
                         f"{epsilon!r}")
    try:
        return tuple(float(p) for p in parts if not isinstance(p, bool))
    except (TypeError, ValueError):
        raise InputError(f"epsilon must be a number, a list of numbers or 'A,B,...', got "
                         f"{epsilon!r}") from None


def _source(obj: Source, role: str, keep: list, what: str = "") -> str:
    """The path the checkpoint layer opens: the given path / hub ID, or a registered
    in-memory checkpoint (kept alive in `keep` for the duration of the call)."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    ck = as_checkpoint(obj, role)
    if ck is None:
        raise InputError(f"{what or role}: expected {_KINDS}; got {type(obj).__name__}")
    keep.append(ck)
    return ck.path


# ----------------------------------------------------------------------------------- commands


def scan(base: Source, tuned: Source, *, top_k: int = DEFAULT_TOP_K, epsilon=DEFAULT_EPSILONS[0],
         vectors: str = "left", include: str | None = None, exclude: str | None = None,
         device: str = "auto", cache_dir: str | None = None, no_cache: bool = False,
         allow_nonfinite: bool = False, progress: bool = False) -> ScanResult:
    """Find the intruder dimensions of TUNED against BASE (`intruder scan BASE TUNED`).

    Args:
        base: the base model (path, hub ID, state dict or module).
        tuned: the fine-tune: the same kinds, or a PEFT adapter directory / PeftModel.
        top_k: tuned singular vectors tested per matrix (the paper's k).
        epsilon: intruder iff max |cos| < epsilon; a list counts at each (the first decides).
        vectors: 'left', 'right' or 'both' singular vectors.
        include / exclude: regular expressions adding / removing tensors.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        cache_dir / no_cache: the base spectral cache (default location unless no_cache).
        progress: a progress bar on stderr.

    Returns a ScanResult; nothing is written.

    >>> r = intruder.scan("fixtures/demo/models/base", "fixtures/demo/adapters/lora_r8",
    ...                   no_cache=True)
    >>> r.verdict.label, r.verdict.estimated_rank, r.summary["total_intruders"]
    ('lora-like', 8, 83)
    >>> int(r.to_dataframe()["count@0.5"].sum())
    83
    """
    config = _config(top_k, epsilon, vectors, include, exclude, device, cache_dir, no_cache,
                     allow_nonfinite)
    keep: list = []
    b = _source(base, "base", keep)
    t = _source(tuned, "tuned", keep)
    return _result(run_scan(b, t, config, progress=progress, command="intruder.scan()"))


def _many(fn, mode, base, tuneds, top_k, epsilon, vectors, include, exclude, device, cache_dir,
          no_cache, allow_nonfinite, progress) -> TrackResult:
    config = _config(top_k, epsilon, vectors, include, exclude, device, cache_dir, no_cache,
                     allow_nonfinite, DEFAULT_EPSILONS)
    if isinstance(tuneds, (str, os.PathLike)) or not isinstance(tuneds, (Sequence, Mapping)):
        raise InputError(f"{mode}: give a list (or a {{label: model}} dict) of checkpoints, got "
                         f"{type(tuneds).__name__}")
    labels = list(tuneds) if isinstance(tuneds, Mapping) else None
    items = list(tuneds.values()) if isinstance(tuneds, Mapping) else list(tuneds)
    if not items:
        raise InputError(f"{mode}: give at least one checkpoint after the base")
    keep: list = []
    b = _source(base, "base", keep)
    paths = [_source(x, "tuned", keep, f"{mode} checkpoint {i + 1}") for i, x in enumerate(items)]
    tr = fn(b, paths, config, progress=progress, command=f"intruder.{mode}()")
    if labels is None:
        labels = [e.label if not e.label.startswith("<memory") else e.label.split(": ", 1)[-1]
                  .rstrip(">") for e in tr.entries]
        if len(set(labels)) != len(labels):
            labels = [f"{i + 1}: {l}" for i, l in enumerate(labels)]
    tr = dataclasses.replace(tr, entries=tuple(dataclasses.replace(e, label=str(l))
                                               for e, l in zip(tr.entries, labels)))
    return _track_result(tr)


def compare(base: Source, tuneds, *, top_k: int = DEFAULT_TOP_K, epsilon=DEFAULT_EPSILONS,
            vectors: str = "left", include: str | None = None, exclude: str | None = None,
            device: str = "auto", cache_dir: str | None = None, no_cache: bool = False,
            allow_nonfinite: bool = False, progress: bool = False) -> TrackResult:
    """Independent fine-tunes of one base side by side (`intruder compare BASE FT...`); the
    base is decomposed once. `tuneds`: a list, or a {label: checkpoint} dict. Options as scan.

    >>> c = intruder.compare("fixtures/demo/models/base", {
    ...     "lora": "fixtures/demo/adapters/lora_r8", "full": "fixtures/demo/models/full_ft"},
    ...     no_cache=True)
    >>> {label: v.label for label, v in c.verdicts.items()}
    {'lora': 'lora-like', 'full': 'full-ft-like'}
    """
    return _many(run_compare, "compare", base, tuneds, top_k, epsilon, vectors, include, exclude,
                 device, cache_dir, no_cache, allow_nonfinite, progress)


def track(base: Source, steps, *, top_k: int = DEFAULT_TOP_K, epsilon=DEFAULT_EPSILONS,
          vectors: str = "left", include: str | None = None, exclude: str | None = None,
          device: str = "auto", cache_dir: str | None = None, no_cache: bool = False,
          allow_nonfinite: bool = False, progress: bool = False) -> TrackResult:
    """Sequential fine-tunes (`intruder track BASE STEP...`): every step against the base and
    the step before; intruders followed along. An adapter step applies to the previous step."""
    return _many(run_track, "track", base, steps, top_k, epsilon, vectors, include, exclude,
                 device, cache_dir, no_cache, allow_nonfinite, progress)


# -------------------------------------------------------------------------------------- files


def load_report(path) -> ScanResult | TrackResult | Any:
    """Read a JSON report the tool wrote, validated against the published schema: a scan
    report gives a ScanResult (equal to the one saved), a compare / track a TrackResult, a
    scale-results file its ScaleTable (intruder.report.scale_results).

    >>> intruder.load_report("reports/demo/full_ft-scan.json").verdict.label
    'full-ft-like'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load_report: expected the path of a JSON report, got "
                         f"{type(path).__name__}")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ReportError(f"{p}: no report there (run `intruder scan BASE TUNED` first)")
    doc = read_json(p, ReportError, "report", max_bytes=None)
    if isinstance(doc, dict) and "kind" in doc:
        return _load_track(doc, p)
    if isinstance(doc, dict) and "intervention" in doc:
        check_format(doc, p)  # another tool's file: says so before any schema detail
        try:
            _schema.validate(doc)
        except ReportError as exc:
            raise ReportError(f"{p}: violates the report schema: {exc}") from None
        return parse_scale_results(doc, p)
    return _result(_schema.load_report(p))


def _load_track(doc: dict, path: str) -> TrackResult:
    try:
        _schema.validate(doc)
    except ReportError as exc:
        raise ReportError(f"{path}: violates the report schema: {exc}") from None
    mode = doc["kind"].split("-", 1)[1]
    entries = []
    for e in doc["entries"]:
        vb = _schema.from_dict(e["vs_base"], f"{path}: {e['label']}")
        vp = _schema.from_dict(e["vs_previous"], path) if e.get("vs_previous") else None
        pers = {n: Persistence(**{k: tuple(v) for k, v in p.items()})
                for n, p in (e.get("persistence") or {}).items()}
        entries.append(TrackEntry(label=e["label"], path=e["path"], vs_base=vb, vs_previous=vp,
                                  persistence=pers))
    first = entries[0].vs_base
    tr = TrackReport(mode=mode, base=first.base, config=first.config, entries=tuple(entries),
                     seconds=float(doc.get("seconds", 0.0)), device=doc.get("device", ""),
                     created=doc.get("created", ""), command=doc.get("command", ""),
                     tool_version=doc.get("tool_version", ""))
    return _track_result(tr)


def evaluate(model, evals: str | Sequence[str] = ("wikitext",), *, tokenizer=None,
             limit: int | None = None, device: str = "auto", dtype: str | None = None,
             max_length: int | None = None, model_config: str | None = None,
             progress: bool = False) -> list[EvalResult]:
    """Run evaluators (`intruder eval MODEL --eval SPEC`) on a model path or an in-memory
    transformers model (with its `tokenizer`, else the one saved beside `name_or_path`).

    evals: 'wikitext[:PATH]' (lm-eval's wikitext metrics; equal to lm-eval 0.4.13 run with
    add_bos_token=False), 'wikitext-sliding[:PATH]' (plus the transformers guide's token
    perplexity), 'task:PATH' (multiple choice JSON or held-out text), 'lm-eval:TASK[,TASK...]'
    (lm-evaluation-harness tasks); `from intruder.evaluate import available` lists them.
    Returns EvalResults, each naming its protocol and unit."""
    specs = [evals] if isinstance(evals, str) else list(evals)
    if isinstance(model, (str, os.PathLike)):
        return evaluate_model(os.fspath(model), specs, model_config=model_config,
                                 device=device, dtype=dtype, max_length=max_length, limit=limit,
                                 progress=progress)
    lm = _loaded(model, tokenizer, device, max_length)
    return evaluate_model(lm, specs, limit=limit, progress=progress)


def _loaded(model, tokenizer, device: str, max_length: int | None):
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"model: expected a path or a transformers model, got "
                         f"{type(model).__name__}")
    if tokenizer is None:
        src = getattr(model.config, "name_or_path", "") or ""
        if not src or not os.path.isdir(src):
            raise InputError("model: pass tokenizer= (the model does not name a local "
                             "directory holding its tokenizer)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    dev = resolve_device(device)
    if device != "auto" or next(model.parameters()).device.type != "cpu":
        model.to(dev)
    dev = str(next(model.parameters()).device)
    model.eval()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    ml = int(max_length) if max_length else context_length(model.config, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, max_length=ml,
                       path=getattr(model.config, "name_or_path", "") or type(model).__name__,
                       dtype=dtype)


def rescale(model_or_state_dict, report, alpha: float, *, epsilon: float | None = None,
            device: str | None = None):
    """The intruders of `report` scaled by `alpha` in a copy of the model, in memory
    (`intruder scale --alpha A` without files): W' = Wt + (alpha - 1) sum_j sigma_j u_j v_j^T.

    model_or_state_dict: the scanned TUNED model (a transformers / torch module, a PeftModel,
    merged on the way, or a {name: tensor} dict). report: its ScanResult (or a path to its JSON).
    epsilon: rescale every top-k vector with max|cos| < epsilon instead of the report's own.
    Returns a new model (for a transformers model, one that lm-eval's HFLM takes as
    `pretrained=`) or a new dict; the input is left as it was.

    >>> from safetensors.torch import load_file
    >>> sd = load_file("fixtures/demo/models/lora_r1/model.safetensors")
    >>> r = intruder.scan("fixtures/demo/models/base", sd, no_cache=True)
    >>> removed = intruder.rescale(sd, r, 0.0)
    >>> sum(not (removed[k] == sd[k]).all() for k in sd) == r.summary["layers_with_intruders"]
    True
    """
    if isinstance(report, (str, os.PathLike)):
        report = load_report(report)
    if not isinstance(report, ScanReport):
        raise InputError(f"report: expected a scan result or the path of its JSON, got "
                         f"{type(report).__name__}")
    return rescaled_copy(model_or_state_dict, report, alpha, epsilon, device)


def verdict_line(result: ScanReport) -> str:
    """The terminal line of a result's verdict (same sentence as the HTML banner)."""
    return verdict_text(verdict_of(result))


__all__ = ["ScanResult", "TrackResult", "compare", "evaluate",
           "load_report", "rescale", "scan", "track", "verdict_line"]
