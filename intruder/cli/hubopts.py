"""Options shared by every command that opens checkpoints: --offline (hub IDs from the local
cache only) and --strict-base (an adapter's declared base must be BASE)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from ..errors import EvalError
from ..io import hub
from ..types import CheckpointInfo
from .common import echo_err

F = TypeVar("F", bound=Callable[..., Any])

HUB_HELP = ("Checkpoints may be Hugging Face model IDs, org/name or org/name@revision (a local "
            "path of the same spelling wins).")


def offline_option(fn: F) -> F:
    """Add --offline; run the command with intruder.io.hub settings for it and for -q."""

    @click.option("--offline", is_flag=True,
                  help="Read hub model IDs from the local Hugging Face cache only, never the "
                       "network (also HF_HUB_OFFLINE=1).")
    @functools.wraps(fn)
    def wrapper(*args: Any, offline: bool = False, **kwargs: Any) -> Any:
        with hub.settings(offline=True if offline else None,
                          progress=not kwargs.get("quiet", False)):
            return fn(*args, **kwargs)

    return cast(F, wrapper)


def strict_base_option(fn: F) -> F:
    return click.option(
        "--strict-base", is_flag=True,
        help="Fail (exit 1) when an adapter's declared base (base_model_name_or_path) is not "
             "BASE, or cannot be checked, instead of warning.")(fn)


def report_base_check(info: CheckpointInfo, quiet: bool = False) -> None:
    """stderr: the declared-base warning (mismatch) or note (unverified / undeclared)."""
    check = info.declared_base or {}
    status = check.get("status")
    if status == "mismatch":
        click.echo(f"Warning: adapter {info.path}: {check.get('detail')}", err=True)
    elif status in ("unverified", "undeclared"):
        echo_err(f"note: adapter {info.path}: {check.get('detail')}", quiet)


def resolve_model(spec: str) -> tuple[str, dict[str, Any] | None]:
    """(local path, hub source or None) for MODEL: itself, or the snapshot a hub ID names."""
    import os

    if os.path.lexists(spec):
        return spec, None
    if hub.parse(spec) is not None:
        src = hub.resolve(spec)
        return src.path, {"repo_id": src.repo_id, "revision": src.revision, "commit": src.commit}
    raise EvalError(f"{spec}: no such file or directory (nor a hub ID org/name[@revision])")
