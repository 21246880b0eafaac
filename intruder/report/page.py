"""Building blocks of the HTML pages: escaping, tables, inline figures, shipped assets.

The scan audit (html.py) and the views that add sections to it or write their own page
(margin_view.py, track_view.py) share these; none of them imports another's internals.
"""

from __future__ import annotations

import base64
import hashlib
import html as _html
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .plots import to_png


def escape(s: object) -> str:
    """HTML-escape any value for text or a quoted attribute; a file name that is not valid
    Unicode (non-UTF-8 bytes, or any non-ASCII name under LANG=C) is shown with its bytes
    escaped (\xe9) instead of breaking the page's UTF-8."""
    text = str(s)
    if not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _html.escape(text, quote=True)


@dataclass(frozen=True)
class Section:
    """An extra section contributed by another command (track view, margin view ...).
    `html` is inserted as given: build it with `escape` / `table_html`."""

    title: str
    html: str
    anchor: str = ""


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "",
               num: Sequence[int] = ()) -> str:
    """An escaped HTML table; columns listed in `num` are right-aligned."""
    h = "".join(f'<th class="num">{escape(x)}</th>' if i in num else f"<th>{escape(x)}</th>"
                for i, x in enumerate(headers))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(
            f'<td class="num">{escape(fmt_cell(c))}</td>' if i in num else f"<td>{escape(fmt_cell(c))}</td>"
            for i, c in enumerate(r)) + "</tr>")
    return f'<table class="{escape(cls)}"><thead><tr>{h}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def fmt_cell(c) -> str:
    """A table cell as text: floats to a few significant digits, None empty."""
    if isinstance(c, float):
        if c != c:
            return "n/a"
        if 1e4 <= abs(c) < 1e12:
            return f"{c:,.1f}"
        return f"{c:.4g}" if abs(c) < 1e-3 or abs(c) >= 1e12 else f"{c:.3f}"
    return "" if c is None else str(c)


def asset(name: str) -> str:
    """A file shipped beside this module (audit.css, audit.js), as text."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, name), encoding="utf-8") as fh:
        return fh.read()


def csp_hash(text: str) -> str:
    """The Content-Security-Policy source that allows exactly this inline text."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


class Figures:
    """Renders figures to inline PNG <figure> elements and counts them."""

    def __init__(self, dpi: int = 100):
        self.dpi = dpi
        self.n = 0

    def __call__(self, fig, alt: str, caption: str) -> str:
        data = base64.b64encode(to_png(fig, self.dpi)).decode("ascii")
        self.n += 1
        return (f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{caption}</figcaption></figure>")
