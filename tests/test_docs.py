"""The user documentation stays true: every relative link in README.md, SECURITY.md,
fixtures/README.md and docs/ resolves (file and heading), docs/settings.md lists exactly
intruder/settings.py's knobs, and the examples of docs/api.md run. `python tests/test_docs.py`
rewrites the generated table in docs/settings.md."""

from __future__ import annotations

import doctest
import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS_MD = os.path.join(ROOT, "docs", "settings.md")
BEGIN = "<!-- generated from intruder/settings.py KNOBS by tests/test_docs.py: do not edit -->"
END = "<!-- end of generated table -->"

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def render_settings_table() -> str:
    """The knobs of intruder/settings.py as a Markdown table."""
    from intruder.settings import KNOBS

    rows = ["| variable | meaning | default | overridden by |", "| --- | --- | --- | --- |"]
    for k in KNOBS.values():
        rows.append(f"| `{k.name}` | {k.meaning} | {k.default} | {k.flag or '-'} |")
    return "\n".join(rows)


def _generated_block(text: str) -> str:
    assert BEGIN in text and END in text, f"{SETTINGS_MD}: the generated-table markers are missing"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        text = _FENCE.sub("", fh.read())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def _doc_files() -> list[str]:
    top = [os.path.join(ROOT, p) for p in ("README.md", "SECURITY.md", "fixtures/README.md")]
    return [*top, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_every_relative_link_resolves():
    bad = []
    for doc in _doc_files():
        with open(doc, encoding="utf-8") as fh:
            text = _FENCE.sub("", fh.read())
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not os.path.exists(full):
                bad.append(f"{os.path.relpath(doc, ROOT)}: {target} (no such file)")
            elif anchor and full.endswith(".md") and anchor not in _anchors(full):
                bad.append(f"{os.path.relpath(doc, ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_settings_doc_matches_settings_module():
    with open(SETTINGS_MD, encoding="utf-8") as fh:
        current = _generated_block(fh.read())
    assert current == render_settings_table(), "docs/settings.md is stale: python tests/test_docs.py"


def test_api_examples_run(monkeypatch):
    pytest.importorskip("pandas")
    monkeypatch.chdir(ROOT)  # the examples name the bundled demo by relative path
    res = doctest.testfile(os.path.join(ROOT, "docs", "api.md"), module_relative=False,
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted >= 15


def _write_settings_table() -> None:
    with open(SETTINGS_MD, encoding="utf-8") as fh:
        text = fh.read()
    old = _generated_block(text)
    with open(SETTINGS_MD, "w", encoding="utf-8") as fh:
        fh.write(text.replace(old, render_settings_table(), 1))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _write_settings_table()
    print(f"wrote {os.path.relpath(SETTINGS_MD)}")
