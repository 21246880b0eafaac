"""WikiText-2 data: where to find it, how to cut it into articles, how to detokenize it.

The lm-eval `wikitext` task reads `EleutherAI/wikitext_document_level` (config
`wikitext-2-raw-v1`), whose rows are whole Wikipedia articles. That dataset is a deterministic
function of the raw file `wiki.test.raw`, so we rebuild it locally:

* the file is split on "\\n" into lines;
* a line is an article title when, stripped, it reads `= Title =` (one `=` on each side); section
  headings ` = = Sub = = ` and deeper are part of the article;
* an article is its title line and every line up to the next title, joined with "\\n"; a chunk
  that is only whitespace (the file's leading blank line) is not an article.

On the test file this gives the dataset's 62 documents.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..errors import EvalError

WIKITEXT_ENV = "INTRUDER_WIKITEXT"  # path to wiki.test.raw (or any wiki.*.raw)
DATA_DIR_ENV = "INTRUDER_DATA_DIR"  # folder holding wikitext-2-raw/wiki.test.raw
WIKITEXT_RELPATH = Path("wikitext-2-raw") / "wiki.test.raw"
HUB_DATASET = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")


@dataclass(frozen=True)
class WikiDocument:
    """One article: its raw text and the raw-file lines it spans."""

    text: str  # "\n".join(lines[start:stop]), the dataset's `page`
    start: int  # first line index (the title line)
    stop: int  # one past the last line index


@dataclass(frozen=True)
class WikiCorpus:
    """A raw WikiText file as lines, and the articles cut from it."""

    lines: tuple[str, ...]
    documents: tuple[WikiDocument, ...]
    source: str  # where it came from, for provenance

    def hf_rows(self, n_docs: int | None = None) -> list[str]:
        """Rows of the line-level HF `wikitext` dataset for the first n_docs articles.

        That dataset keeps each line with its newline and turns blank lines into "". The rows
        start at line 0 (the leading blank line) so that the full corpus reproduces the
        transformers perplexity guide's `"\\n\\n".join(test["text"])` exactly.
        """
        stop = len(self.lines) if n_docs is None else self.documents[n_docs - 1].stop
        rows = []
        for i, line in enumerate(self.lines[:stop]):
            last = i == len(self.lines) - 1
            if last and line == "":  # the empty string after the file's final newline
                continue
            rows.append(line + "\n" if line.strip() else "")
        return rows


def is_article_title(line: str) -> bool:
    """True for ` = Title = ` (level-1 heading), False for ` = = Section = = ` and body text."""
    s = line.strip()
    return (s.startswith("= ") and not s.startswith("= =")
            and s.endswith(" =") and not s.endswith("= =") and len(s) > 3)


def split_documents(lines: Sequence[str]) -> list[WikiDocument]:
    """Cut raw WikiText lines into articles (see the module docstring for the rule)."""
    docs: list[WikiDocument] = []
    start = 0
    for i, line in enumerate(lines):
        if is_article_title(line) and i > start:
            _emit(lines, start, i, docs)
            start = i
    _emit(lines, start, len(lines), docs)
    return docs


def _emit(lines: Sequence[str], start: int, stop: int, docs: list[WikiDocument]) -> None:
    text = "\n".join(lines[start:stop])
    if text.strip():
        docs.append(WikiDocument(text=text, start=start, stop=stop))


# --- detokenization -----------------------------------------------------------------------------
# Steps in lm-eval's order; each is ("str", old, new) for a plain replace or ("re", pattern, repl).
_DETOK_STEPS: tuple[tuple[str, str, str], ...] = (
    ("str", "s '", "s'"),  # plural possessive: "players ' " -> "players' "
    # This pattern has literal slashes and never matches WikiText; it is kept so our output
    # stays byte-identical to the reference detokenizer on any input.
    ("re", r"/' [0-9]/", r"/'[0-9]/"),
    ("str", " @-@ ", "-"),  # number and compound separators
    ("str", " @,@ ", ","),
    ("str", " @.@ ", "."),
    ("str", " : ", ": "),  # spaced punctuation
    ("str", " ; ", "; "),
    ("str", " . ", ". "),
    ("str", " ! ", "! "),
    ("str", " ? ", "? "),
    ("str", " , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),  # padding inside brackets and quotes
    ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="),  # heading marks
    ("str", "= = =", "==="),
    ("str", "= =", "=="),
    ("str", " \u00b0 ", "\u00b0"),  # degree sign
    ("str", " \n", "\n"),
    ("str", "\n ", "\n"),
    ("str", " N ", " 1 "),  # WikiText's number placeholder
    ("str", " 's", "'s"),
)
_DETOK_COMPILED: tuple[tuple[re.Pattern[str] | str, str], ...] = tuple(
    (re.compile(a) if kind == "re" else a, b) for kind, a, b in _DETOK_STEPS)


def detokenize(text: str) -> str:
    """Undo WikiText's tokenization the way lm-eval's `wikitext_detokenizer` does, step for step."""
    for old, new in _DETOK_COMPILED:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def count_words(text: str) -> int:
    """lm-eval's word count for perplexity: pieces of the ORIGINAL text split on whitespace runs.

    A leading or trailing blank gives an empty piece that is counted, as in lm-eval.
    """
    return len(re.split(r"\s+", text))


# --- locating and loading -----------------------------------------------------------------------
def find_wikitext_file(path: str | None = None) -> Path | None:
    """The raw file to read: explicit path, then $INTRUDER_WIKITEXT, then $INTRUDER_DATA_DIR."""
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            for cand in (p / WIKITEXT_RELPATH, p / "wiki.test.raw"):
                if cand.is_file():
                    return cand
            raise EvalError(f"no wiki.test.raw under {p}")
        if not p.is_file():
            raise EvalError(f"WikiText file not found: {p}")
        return p
    env = settings.wikitext()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise EvalError(f"${WIKITEXT_ENV} points to {p}, which is not a file")
        return p
    env = settings.data_dir()
    if env:
        p = Path(env).expanduser() / WIKITEXT_RELPATH
        if not p.is_file():
            raise EvalError(f"${DATA_DIR_ENV}/{WIKITEXT_RELPATH} does not exist ({p})")
        return p
    return None


def load_wikitext(path: str | None = None) -> WikiCorpus:
    """Load WikiText-2 raw test data from a local file, else from the Hugging Face hub."""
    p = find_wikitext_file(path)
    if p is not None:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EvalError(f"cannot read WikiText file {p}: {exc}") from exc
        lines = tuple(text.split("\n"))
        source = str(p)
    else:
        lines = _lines_from_hub()
        source = "hf://datasets/{}/{} ({})".format(*HUB_DATASET)
    docs = split_documents(lines)
    if not docs:
        raise EvalError(f"no WikiText articles (lines ' = Title = ') found in {source}")
    return WikiCorpus(lines=lines, documents=tuple(docs), source=source)


_HOW_TO_POINT = (f"pass --eval wikitext:/path/to/wiki.test.raw, or set ${WIKITEXT_ENV} to that file, "
                 f"or set ${DATA_DIR_ENV} to a folder holding {WIKITEXT_RELPATH}")


def _lines_from_hub() -> tuple[str, ...]:
    """Rebuild the raw file's lines from the document-level dataset on the hub.

    The dataset's pages are consecutive line ranges joined with "\\n" and start after the file's
    leading blank line, so `[" "] + "\\n".join(pages).split("\\n")` is the raw file again.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise EvalError(f"no local WikiText-2 data and the hub is offline: {_HOW_TO_POINT}")
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise EvalError(f"no local WikiText-2 data and `datasets` is not installed: {_HOW_TO_POINT}") from None
    if not _hub_reachable():  # fail at once instead of after the hub client's retries
        raise EvalError(f"no local WikiText-2 data and huggingface.co is unreachable: {_HOW_TO_POINT}")
    try:
        ds = datasets.load_dataset(HUB_DATASET[0], HUB_DATASET[1], split=HUB_DATASET[2])
        pages = [row["page"] for row in ds]
    except Exception as exc:  # network, auth, cache: all mean "use a local file"
        raise EvalError(f"could not fetch {HUB_DATASET[0]} from the hub ({type(exc).__name__}); "
                        f"{_HOW_TO_POINT}") from exc
    return tuple([" "] + "\n".join(pages).split("\n"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
