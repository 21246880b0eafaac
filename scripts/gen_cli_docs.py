"""Write docs/cli.md from the commands' own --help (run it after changing an option).

    python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check  # exit 1 when docs/cli.md is out of date (CI)
"""

from __future__ import annotations

import os
import sys

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "docs", "cli.md")
HEADER = """# Command-line reference

Generated from each command's `--help` by `scripts/gen_cli_docs.py`; a test fails when this file
and the code disagree. Exit codes are listed in the README, environment settings in
[settings.md](settings.md).
"""


def _help(cmd: click.Command, path: list[str]) -> str:
    # the group's help_option_names (-h, --help), as a real invocation has them: click keeps the
    # help option it built first, so without them the text would depend on what ran before
    ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=100, max_content_width=100,
                        help_option_names=["-h", "--help"])
    return cmd.get_help(ctx)


def render() -> str:
    """The whole reference: the group's help, then each command (and sub-command) in order."""
    sys.path.insert(0, ROOT)
    from intruder.cli import cli

    parts = [HEADER, "## intruder\n", "```text\n" + _help(cli, ["intruder"]) + "\n```\n"]

    def walk(group: click.Group, path: list[str]) -> None:
        for name in sorted(group.commands):
            cmd = group.commands[name]
            if cmd.hidden:
                continue
            sub = [*path, name]
            parts.append(f"## {' '.join(sub)}\n")
            parts.append("```text\n" + _help(cmd, sub) + "\n```\n")
            if isinstance(cmd, click.Group):
                walk(cmd, sub)

    walk(cli, ["intruder"])
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        try:
            with open(TARGET, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            print("docs/cli.md is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    tmp = TARGET + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
