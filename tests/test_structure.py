"""The package's shape: no module of distres imports itself back through others, and its functions are short."""

import ast
from pathlib import Path

from tests.helpers import REPO


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The distres modules a file imports, at module level or inside functions."""
    found = set()
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_no_import_circle_in_distres():
    files = sorted((REPO / "distres").rglob("*.py"))
    modules = {_module(f) for f in files}
    graph = {_module(f): _imports(f, modules) - {_module(f)} for f in files}
    # A package's __init__ only re-exports lazily; an edge from a module to its own package is
    # Python's import machinery, not a design dependency.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert graph["distres.data.loaders"] >= {"distres.data.base"}  # the walk does find imports

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    circles = [c for m in graph if (c := cycle_from(m))]
    assert not circles, " -> ".join(circles[0])


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_functions_fit_on_a_screen():
    """No function of distres over 60 lines (its def to its last line, docstring included), and
    the training loop's epoch within 30: each reads whole, and a longer one is a sign that it
    does several things."""
    files = sorted((REPO / "distres").rglob("*.py"))
    long = [
        f"{path.relative_to(REPO)}: {name} ({lines} lines)"
        for path in files
        for name, lines in _functions(path)
        if lines > 60
    ]
    assert not long, "\n".join(long)
    [(_, epoch)] = [f for f in _functions(REPO / "distres" / "train.py") if f[0] == "train_epoch"]
    assert epoch <= 30, f"train_epoch is {epoch} lines"
