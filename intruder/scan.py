"""Library entry point of a scan: index both checkpoints, pair them, run the engine, build a report."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time

from . import __version__
from .errors import IntruderError
from .io import identity, open_checkpoint, pair_checkpoints, read_ref
from .io.basecheck import check_base, declared_base_spec, enforce, warning_text
from .report.schema import SCHEMA_VERSION
from .report.verdict import decide
from .run.cache import BaseCache
from .run.devices import resolve_device
from .run.driver import scan_pairs
from .types import ScanConfig, ScanReport


def validate_config(config: ScanConfig) -> None:
    import re

    if config.top_k < 1:
        raise IntruderError(f"--top-k must be at least 1, got {config.top_k}")
    for e in config.epsilons:
        if not 0.0 < e <= 1.0:
            raise IntruderError(f"--epsilon values must lie in (0, 1], got {e}")
    if config.vectors not in ("left", "right", "both"):
        raise IntruderError(f"--vectors must be left, right or both, got {config.vectors!r}")
    for opt, rx in (("--include", config.include), ("--exclude", config.exclude)):
        if rx:
            try:
                re.compile(rx)
            except re.error as exc:
                raise IntruderError(f"{opt} {rx!r}: not a valid regular expression ({exc})") from exc


def run_scan(base: str | None, tuned: str, config: ScanConfig | None = None,
             progress: bool = False, base_cache=None, command: str = "",
             strict_base: bool = False) -> ScanReport:
    """Scan TUNED against BASE and return the report (nothing is written). BASE None: TUNED is
    an adapter whose declared base (base_model_name_or_path) is used. strict_base: an adapter
    whose declared base is not BASE is an error, not a warning."""
    config = config or ScanConfig()
    validate_config(config)
    t0 = time.perf_counter()
    tuned_ck = open_checkpoint(tuned)
    if base is None:
        if tuned_ck.kind != "adapter":
            raise IntruderError(f"{tuned}: one checkpoint alone must be a PEFT adapter (its "
                                f"declared base is used); give BASE and TUNED")
        base = declared_base_spec(tuned_ck)
    base_ck = open_checkpoint(base, allow_adapter=False)
    identity.prefetch(base_ck.identity_files() + tuned_ck.identity_files())  # overlaps the scan
    base_check = _base_check(tuned_ck, base_ck, strict_base)
    pairing = pair_checkpoints(base_ck, tuned_ck, config.include, config.exclude)
    if not pairing.pairs:
        raise IntruderError(f"no matrices to scan between {base} and {tuned} "
                            f"({len(pairing.skipped)} paired tensors were filtered out; "
                            f"see --include / --exclude)")
    if base_cache is None and config.cache_dir:
        base_cache = BaseCache(config.cache_dir)
    handles: dict = {}  # parsed headers, one file at a time
    layers = list(scan_pairs(pairing.pairs, lambda ref: read_ref(ref, handles), config,
                             progress=progress, base_cache=base_cache))
    layers = with_storage(pairing.pairs, layers)
    device = str(resolve_device(config.device))
    warnings = list(derivation_warnings(layers, config))
    skipped = list(pairing.skipped)
    skipped += [(l.name, "non-finite weights (--allow-nonfinite)") for l in layers
                if l.status == "nonfinite"]
    tuned_info = tuned_ck.info()
    if base_check is not None:
        tuned_info = dataclasses.replace(tuned_info, declared_base=base_check.to_dict())
        text = warning_text(base_check, tuned_ck.path)
        warnings += [text] if text else []
    report = ScanReport(
        base=base_ck.info(), tuned=tuned_info, config=config, layers=tuple(layers),
        unpaired_base=pairing.unpaired_base, unpaired_tuned=pairing.unpaired_tuned,
        skipped=tuple(skipped), warnings=tuple(warnings), seconds=time.perf_counter() - t0,
        device=device, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        tool_version=__version__, schema_version=SCHEMA_VERSION)
    return dataclasses.replace(report, verdict=decide(report))


def with_storage(pairs, layers):
    """Layers of quantized or scaled tensors get `storage_base` / `storage_tuned` fields saying
    how each side was stored and decoded (io/dequant.py, io/gguf.py) before the analysis."""
    import dataclasses

    out = []
    for p, l in zip(pairs, layers):
        tuned = p.tuned if p.tuned is not None and p.tuned != p.base else None
        if p.base.storage is None and (tuned is None or tuned.storage is None):
            out.append(l)
            continue
        out.append(dataclasses.replace(
            l, storage_base=_storage_text(p.base),
            storage_tuned=_storage_text(tuned) if tuned is not None else None))
    return out


def _storage_text(ref) -> str:
    return ref.storage.kind if ref.storage is not None else ref.dtype.lower()


def _base_check(tuned_ck, base_ck, strict: bool):
    """The adapter's declared base against BASE (None when TUNED is not an adapter)."""
    if tuned_ck.kind != "adapter" or not tuned_ck.files:  # in memory: a PeftModel's own base
        return None
    check = check_base(tuned_ck, base_ck)
    enforce(check, tuned_ck.path, strict)
    return check


UNRELATED_COS = 0.25  # weight cosine below which a matrix looks unrelated to its base


def derivation_warnings(layers, config: ScanConfig):
    """Warn when TUNED does not look derived from BASE: then intruder counts mean nothing."""
    scanned = [l for l in layers if l.status == "scanned" and l.max_cos]
    if len(scanned) < 2:
        return
    k_total = sum(len(l.max_cos) for l in scanned)
    n_intr = sum(1 for l in scanned for c in l.max_cos if c < config.epsilon)
    frac_layers = sum(1 for l in scanned if all(c < config.epsilon for c in l.max_cos)) / len(scanned)
    rel = sorted(l.delta_fro_rel for l in scanned)
    median_rel = rel[len(rel) // 2]
    # weight cosine <W0, Wt> / (|W0| |Wt|) (margin fields): a fine-tune, even a heavy LoRA that
    # turns most top vectors into intruders, keeps it well above 0; unrelated weights sit near 0
    got = {l.name: l.margin.weight_cos if l.margin is not None else None for l in scanned}
    wcos = {n: c for n, c in got.items() if c is not None}
    if len(wcos) == len(got):
        far = sorted(n for n, c in wcos.items() if c < UNRELATED_COS)
        med = sorted(wcos.values())[len(wcos) // 2]
        if len(far) > len(scanned) / 2:
            yield (f"TUNED does not look derived from BASE: in {len(far)} of {len(scanned)} "
                   f"matrices the weights are nearly uncorrelated (cosine between W0 and Wt "
                   f"below {UNRELATED_COS:g}; median {med:.2f}, a fine-tune stays near 1) and "
                   f"{n_intr} of {k_total} top vectors are intruders; intruder counts are not "
                   f"meaningful for unrelated models")
        elif far:
            yield (f"{len(far)} of {len(scanned)} matrices look unrelated to BASE (cosine between "
                   f"W0 and Wt below {UNRELATED_COS:g}, e.g. {far[0]}): re-initialised or "
                   f"replaced rather than fine-tuned?")
        return
    if n_intr / k_total > 0.8 and frac_layers > 0.5 and median_rel > 0.5:
        yield (f"TUNED does not look derived from BASE: {n_intr} of {k_total} top vectors are "
               f"intruders, every top vector in {frac_layers:.0%} of matrices, and the median "
               f"relative change ||Wt-W0||_F/||W0||_F is {median_rel:.2f}; intruder counts are not "
               f"meaningful for unrelated models")
