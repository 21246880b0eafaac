"""The package's import graph: no circles, the mathematics imports no runtime or front end, and
an import of intruder's own modules sits at module top unless a comment on it says why not.

Every module of intruder/ is parsed with `ast` (nothing is imported); an edge A -> B is any
import of B in A, at module top or inside a function. Imports under `if TYPE_CHECKING:` are left
out: they never run, and exist so that annotations can name a type without an import edge.
The last test starts the command line in a fresh interpreter: its start loads no heavy library.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "intruder"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` blocks, with
    whether it sits inside a function."""
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def _targets(name: str, is_pkg: bool, node: ast.Import | ast.ImportFrom,
             modules: dict) -> list[str]:
    """The intruder modules an import statement loads (the deepest existing module named)."""
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        named = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in modules else pkg for a in node.names]
    out = []
    for target in named:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.split(".")[0] == "intruder" and target != name:
            out.append(target)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> modules it imports, [(module, line, target)] of imports inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    inner = []
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_function in _imports(tree):
            for target in _targets(name, is_pkg, node, modules):
                graph[name].add(target)
                if in_function:
                    inner.append((name, node.lineno, target))
    return graph, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycles_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules():
    modules = {"intruder": None, "intruder.io": None, "intruder.io.checkpoint": None,
               "intruder.run": None, "intruder.run.stream": None, "intruder.errors": None}
    node = ast.parse("from ..io.checkpoint import Checkpoint").body[0]
    assert _targets("intruder.run.stream", False, node, modules) == ["intruder.io.checkpoint"]
    node = ast.parse("from . import stream").body[0]
    assert _targets("intruder.run", True, node, modules) == ["intruder.run.stream"]
    node = ast.parse("from .. import errors").body[0]
    assert _targets("intruder.run.stream", False, node, modules) == ["intruder.errors"]
    node = ast.parse("import intruder.run.stream as s").body[0]
    assert _targets("intruder.io", True, node, modules) == ["intruder.run.stream"]


def test_no_import_cycles():
    graph, _ = import_graph()
    assert "intruder.spectral.engine" in graph and "intruder.run.driver" in graph
    assert cycles(graph) == []


def test_mathematics_imports_no_runtime_or_front_end():
    graph, _ = import_graph()
    for name, targets in graph.items():
        if name == "intruder.spectral" or name.startswith("intruder.spectral."):
            bad = sorted(t for t in targets
                         if t.startswith(("intruder.run", "intruder.cli", "intruder.report")))
            assert not bad, f"{name} imports {bad}"


# The two reasons an import of an intruder module may sit inside a function, written as a
# trailing comment on the statement: it loads a heavy library that the importing module's users
# must not pay for (`# lazy: pulls torch`), or it would close an import circle
# (`# circle: report -> scan`).
HEAVY = ("torch", "matplotlib", "pandas", "transformers", "peft", "lm_eval", "gguf", "scipy",
         "jsonschema")
_REASON = re.compile(r"#\s*(lazy:\s*pulls\s+(" + "|".join(HEAVY) + r")\b|circle:\s*\S+\s*->\s*\S+)")


def unexplained_inner_imports(source: str, name: str, is_pkg: bool,
                              modules: dict) -> list[tuple[int, str]]:
    """(line, statement) of every import of an intruder module inside a function of `source`
    that carries no `# lazy: pulls LIB` / `# circle: A -> B` comment on any of its lines."""
    comments = {tok.start[0]: tok.string
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    out = []
    for node, in_function in _imports(ast.parse(source)):
        if not in_function or not _targets(name, is_pkg, node, modules):
            continue
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if not any(_REASON.search(comments.get(i, "")) for i in lines):
            out.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return out


def test_unexplained_inner_imports_are_found():
    modules = {"intruder": None, "intruder.scan": None, "intruder.report": None,
               "intruder.report.table": None}
    src = """
import json
from typing import TYPE_CHECKING
from . import table
if TYPE_CHECKING:
    from ..scan import run_scan
def f():
    import torch
    from ..scan import run_scan
    from ..scan import run_scan  # lazy: pulls torch
    from ..scan import run_scan  # circle: report.table -> scan
    from ..scan import run_scan  # lazy: it is slow
    from ..scan import (  # lazy: pulls torch
        run_scan,
    )
    from ..scan import (
        run_scan,  # lazy: pulls matplotlib
    )
    from .. import scan
    import intruder.scan  # circle:
"""
    got = unexplained_inner_imports(src, "intruder.report.table", False, modules)
    assert [line for line, _ in got] == [9, 12, 19, 20]


def test_every_inner_import_says_why():
    """An import of an intruder module inside a function names its reason (HEAVY, _REASON), so
    that their number cannot grow back unnoticed; every other one belongs at module top."""
    modules = _modules()
    bad = []
    for name, (path, is_pkg) in modules.items():
        for line, stmt in unexplained_inner_imports(path.read_text(encoding="utf-8"), name,
                                                    is_pkg, modules):
            bad.append(f"{path.relative_to(PKG.parent)}:{line}: {stmt.splitlines()[0]}")
    assert not bad, ("imports inside functions without a '# lazy: pulls LIB' or "
                     "'# circle: A -> B' comment (move them to module top):\n" + "\n".join(bad))


_START = """
import sys
from intruder.cli import main
sys.argv = ["intruder"] + sys.argv[1:]
try:
    main()
except SystemExit:
    pass
print(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)))
"""


def test_command_line_start_loads_no_heavy_library():
    """`intruder --help`, `intruder layers` (and so the terminal table, report.table) run
    without torch, matplotlib or pandas: the lazy imports above are where they stay out."""
    demo = str(PKG.parent / "fixtures" / "demo" / "models" / "lora_r8")
    code = f"HEAVY = {HEAVY!r}\n{_START}"
    for args in ([], ["--help"], ["scan", "--help"], ["layers", demo], ["layers", "--json", demo]):
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             cwd=PKG.parent, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines()[-1] == "[]", (args, res.stdout[-300:])
