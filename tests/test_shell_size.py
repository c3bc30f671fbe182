"""The shells stay readable: no function in ``server/`` or ``client/`` is over a screenful.

A function's length is its lines from ``def`` to its last line (signature and docstring
included), as an editor shows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def long_functions(root: Path, *, limit: int = MAX_LINES) -> dict[tuple[str, str], int]:
    """(file relative to ``root``, qualified name) -> lines, for every function over ``limit``."""
    found: dict[tuple[str, str], int] = {}
    for folder in ("server", "client"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            found.update(_long_in(ast.parse(path.read_text(), rel), rel, "", limit))
    return found


def _long_in(node: ast.AST, rel: str, prefix: str, limit: int) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for child in ast.iter_child_nodes(node):
        name = prefix
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                if lines > limit:
                    out[(rel, name)] = lines
            name += "."
        out.update(_long_in(child, rel, name, limit))
    return out


def test_no_shell_function_is_over_a_screenful() -> None:
    too_long = long_functions(ROOT)
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps): " + (
        ", ".join(f"{f}:{name} ({n})" for (f, name), n in sorted(too_long.items()))
    )


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES))  # def + 60 = 61 lines
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    (tmp_path / "server" / "a.py").write_text(f"class C:\n    def run(self):\n{body}")
    (tmp_path / "client" / "b.py").write_text("def short():\n    return 1\n")
    assert long_functions(tmp_path) == {("server/a.py", "C.run"): MAX_LINES + 1}


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles among the modules of ``server/`` and ``client/`` (any import, even in a body)."""
    graph: dict[str, set[str]] = {}
    for folder in ("server", "client"):
        for path in sorted((root / folder).rglob("*.py")):
            module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
            graph[module] = deps
    for module, deps in graph.items():
        graph[module] = {d for d in deps if d in graph and d != module}
    cycles: list[list[str]] = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycles.append(path)
                elif nxt not in path and nxt > start:  # each cycle once, from its least module
                    stack.append((nxt, [*path, nxt]))
    return cycles


def test_no_import_cycle_between_shell_modules() -> None:
    # client/app.py and client/secure_round.py imported each other before the typed round
    assert import_cycles(ROOT) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "app.py").write_text("from client.secure_round import handle\n")
    (tmp_path / "client" / "secure_round.py").write_text(
        "def handle():\n    from client.app import train_round\n"
    )
    assert import_cycles(tmp_path) == [["client.app", "client.secure_round"]]
