"""An adapter's declared base (`base_model_name_or_path` in adapter_config.json) against the base
it is merged onto.

`declared_base_spec` finds what the adapter names: a path (as given, else relative to the
adapter's folder or one of its parents, where PEFT users often save both) or a hub ID (with the
config's `revision`). `check_base` compares it with the BASE in use: by path, by content hash
(sha256 of the weight files) when both are on this machine, by resolved hub commit when both
are hub repositories. Nothing is downloaded for the check: a declared hub base that is not in the
local cache is compared by repository name only, or left unverified.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import AdapterError, CheckpointError
from . import hub
from .opener import open_checkpoint

PARENTS_SEARCHED = 4  # a relative declared base is looked for this many folders up


@dataclass(frozen=True)
class BaseCheck:
    """Outcome of comparing an adapter's declared base with the base used."""

    declared: str | None  # base_model_name_or_path as written (None: not declared)
    resolved: str | None  # the local path or hub ID it was taken to mean
    given: str  # the base used (path, or repo_id@commit)
    status: str  # match | mismatch | unverified | undeclared
    by: str  # path | sha256 | commit | repo | "" : what decided it
    detail: str  # one sentence for stderr, the report and the HTML

    def to_dict(self) -> dict:
        return asdict(self)


def declared(adapter_ck) -> str | None:
    cfg = adapter_ck.adapter.config if adapter_ck.adapter is not None else {}
    d = cfg.get("base_model_name_or_path")
    return d.strip() if isinstance(d, str) and d.strip() else None


def _local(spec: str, adapter_dir: str) -> str | None:
    """The declared base as an existing local path, or None."""
    if os.path.lexists(spec):
        return spec
    if os.path.isabs(spec):
        return None
    d = os.path.abspath(adapter_dir)
    for _ in range(PARENTS_SEARCHED + 1):
        cand = os.path.join(d, spec)
        if os.path.lexists(cand):
            return cand
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return None


def _hub_spec(spec: str, adapter_ck) -> str | None:
    parsed = hub.parse(spec)
    if parsed is None or parsed[2] is not None:  # a base is a repository, not one file
        return None
    rev = adapter_ck.adapter.config.get("revision")
    if "@" not in spec and isinstance(rev, str) and rev.strip():
        return f"{spec}@{rev.strip()}"
    return spec


def declared_base_spec(adapter_ck) -> str:
    """What `intruder scan ADAPTER` uses as BASE: the adapter's declared base."""
    d = declared(adapter_ck)
    where = os.path.join(adapter_ck.path, "adapter_config.json")
    if d is None:
        raise AdapterError(f"{where}: declares no base_model_name_or_path; give BASE as well "
                           f"(intruder scan BASE ADAPTER)")
    local = _local(d, adapter_ck.path)
    if local is not None:
        return local
    spec = _hub_spec(d, adapter_ck)
    if spec is None:
        raise AdapterError(f"{where}: declared base {d!r} is not on this machine and is not a hub "
                           f"ID; give BASE as well (intruder scan BASE ADAPTER)")
    return spec


def _given(base_ck, info) -> str:
    if info.repo_id and info.commit:
        return f"{info.repo_id}@{info.commit}"
    return base_ck.path


def check_base(adapter_ck, base_ck) -> BaseCheck:
    """Compare the adapter's declared base with `base_ck` (see the module docstring). Contents
    are hashed only when paths and hub commits cannot decide, so that a scan's background
    hashing still overlaps its reads."""
    info = base_ck.info(identity=False)  # path, hub repo and commit
    given = _given(base_ck, info)
    d = declared(adapter_ck)
    if d is None:
        return BaseCheck(None, None, given, "undeclared", "",
                         "the adapter does not declare its base (no base_model_name_or_path)")
    local = _local(d, adapter_ck.path)
    if local is not None:
        if os.path.realpath(local) == os.path.realpath(base_ck.path):
            return BaseCheck(d, local, given, "match", "path", f"declared base {d} is BASE")
        try:
            other = open_checkpoint(local, allow_adapter=False).info()
        except CheckpointError as exc:
            return BaseCheck(d, local, given, "unverified", "",
                             f"declared base {d} ({local}) cannot be read: {exc}")
        return _by_content(d, local, given, other, base_ck.info())
    spec = _hub_spec(d, adapter_ck)
    parsed = hub.parse(spec) if spec is not None else None
    if spec is None or parsed is None:
        return BaseCheck(d, None, given, "unverified", "",
                         f"declared base {d} is not on this machine and is not a hub ID")
    repo, rev, _ = parsed
    commit = hub.cached_commit(repo, rev)
    if info.repo_id and info.repo_id.lower() == repo.lower():
        if commit is None:
            return BaseCheck(d, spec, given, "match", "repo",
                             f"declared base {spec} is the repository of BASE (its revision "
                             f"{rev} is not in the local cache, so the commit was not compared)")
        if commit == info.commit:
            return BaseCheck(d, spec, given, "match", "commit",
                             f"declared base {spec} resolves to BASE's commit {commit[:12]}")
        return BaseCheck(d, spec, given, "mismatch", "commit",
                         f"declared base {spec} is commit {commit[:12]} but BASE is "
                         f"{info.repo_id}@{info.commit[:12] if info.commit else '?'}")
    try:  # the declared repository from the cache only: nothing is downloaded for a check
        other_ck = open_checkpoint(spec, allow_adapter=False, offline=True)
    except CheckpointError:
        if info.repo_id:
            return BaseCheck(d, spec, given, "mismatch", "repo",
                             f"declared base {spec} is another repository than BASE "
                             f"({info.repo_id})")
        return BaseCheck(d, spec, given, "unverified", "",
                         f"declared base {spec} is not in the local hub cache, so it could not "
                         f"be compared with BASE {base_ck.path}")
    return _by_content(d, spec, given, other_ck.info(), base_ck.info())


def _by_content(d, resolved, given, other, info) -> BaseCheck:
    if other.sha256 and other.sha256 == info.sha256:
        return BaseCheck(d, resolved, given, "match", "sha256",
                         f"declared base {d} has the same content (sha256 {info.sha256[:16]}) "
                         f"as BASE")
    return BaseCheck(d, resolved, given, "mismatch", "sha256",
                     f"declared base {d} (content sha256 {(other.sha256 or '?')[:16]}) differs "
                     f"from BASE {given} (content sha256 {(info.sha256 or '?')[:16]})")


def enforce(check: BaseCheck, adapter_path: str, strict: bool) -> None:
    """--strict-base: anything but a match is an error."""
    if strict and check.status != "match":
        raise AdapterError(f"{adapter_path}: --strict-base: {check.status}: {check.detail}")


def warning_text(check: BaseCheck | None, adapter_path: str) -> str | None:
    """The report / stderr warning for a mismatch (None otherwise, and for no check)."""
    if check is not None and check.status == "mismatch":
        return f"adapter {adapter_path}: {check.detail}; the scan measures another model pair"
    return None


def chain_checks(mode: str, base_ck, cks, strict: bool) -> list[BaseCheck | None]:
    """One BaseCheck (or None for a full model) per checkpoint of `compare` (each adapter
    against BASE) or `track` (each adapter against the step it is applied to; after another
    adapter, whose merged weights exist only in memory, the check is left unverified)."""
    out: list[BaseCheck | None] = []
    for i, ck in enumerate(cks):
        if ck.kind != "adapter":
            out.append(None)
            continue
        target = base_ck if mode == "compare" or i == 0 else cks[i - 1]
        if target.kind == "adapter":
            d = declared(ck)
            check = BaseCheck(d, None, target.path, "unverified", "",
                              f"applied to the previous step {target.path}, an adapter merged in "
                              f"memory, so its declared base {d or '(none)'} cannot be compared")
        else:
            check = check_base(ck, target)
        enforce(check, ck.path, strict)
        out.append(check)
    return out
