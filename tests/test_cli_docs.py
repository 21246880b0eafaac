"""docs/cli.md is generated from --help: it must match the code."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gen_cli_docs  # noqa: E402


def test_cli_reference_is_current():
    with open(gen_cli_docs.TARGET, encoding="utf-8") as fh:
        current = fh.read()
    assert current == gen_cli_docs.render(), "docs/cli.md is stale: python scripts/gen_cli_docs.py"


def test_every_command_is_documented():
    from intruder.cli import cli

    text = gen_cli_docs.render()
    for name in cli.commands:
        assert f"## intruder {name}\n" in text
