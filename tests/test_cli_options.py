"""The scan options are declared once: every command that scans has the same names, defaults
(the library's ScanConfig) and help texts, the cache is on for all of them, and the library
below the CLI never reads sys.argv."""

from __future__ import annotations

import os
import re

import click
import pytest

from intruder.cli import cli
from intruder.cli.options import SCAN_PARAMS, cache_root, command_line, scan_config
from intruder.types import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNING = ("scan", "compare", "track", "scale")


def _params(name: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands[name].params if isinstance(p, click.Option)}


def test_every_scanning_command_has_the_same_scan_options():
    ref = _params("scan")
    for name in SCANNING:
        params = _params(name)
        for p in SCAN_PARAMS:
            assert p in params, (name, p)
            assert params[p].opts == ref[p].opts, (name, p)
            assert params[p].default == ref[p].default, (name, p)
            # scale may append a remark of its own, never replace the shared text
            assert (params[p].help or "").startswith(ref[p].help or ""), (name, p)


def test_defaults_are_the_library_defaults():
    d = ScanConfig()
    for name in SCANNING:
        params = _params(name)
        assert params["top_k"].default == d.top_k == 10
        assert params["epsilon"].default == ",".join(format(e, "g") for e in d.epsilons) == "0.5"
        assert params["vectors"].default == d.vectors == "left"
        assert params["device"].default == d.device
        assert params["no_cache"].is_flag and params["allow_nonfinite"].is_flag  # off unless given


def test_cache_is_on_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("INTRUDER_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(None, False) == str(tmp_path / "env")
    assert cache_root(str(tmp_path / "flag"), False) == str(tmp_path / "flag")
    assert cache_root(str(tmp_path / "flag"), True) is None
    monkeypatch.delenv("INTRUDER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(None, False) == os.path.join(str(tmp_path / "xdg"), "intruder")


def test_scan_config_from_options(monkeypatch, tmp_path):
    monkeypatch.setenv("INTRUDER_CACHE_DIR", str(tmp_path))
    c = scan_config(top_k=5, epsilon="0.3,0.7", vectors="both", include="emb", exclude=None,
                    device="cpu", cache_dir=None, no_cache=False, allow_nonfinite=True)
    assert c == ScanConfig(top_k=5, epsilons=(0.3, 0.7), vectors="both", include="emb",
                           device="cpu", allow_nonfinite=True, cache_dir=str(tmp_path))
    with pytest.raises(click.BadParameter, match="--epsilon"):
        scan_config(top_k=5, epsilon="0.5,nan", vectors="left", include=None, exclude=None,
                    device="cpu", cache_dir=None, no_cache=True, allow_nonfinite=False)


def test_command_line_is_the_invocation(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/intruder", "scan", "a b", "c"])
    assert command_line() == "intruder scan a b c"


def test_library_never_reads_argv():
    offenders = []
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "intruder")):
        if os.path.relpath(dirpath, ROOT).split(os.sep)[:2] == ["intruder", "cli"]:
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    if re.search(r"\bsys\.argv\b", fh.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []
