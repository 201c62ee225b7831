"""model/'s imports run one way (ARCHITECTURE.md): no import circle among its modules, no function-local import
breaking one, and nothing in model/ reaching up into the libraries built on it.

The graph is read from the source with `ast`, without importing anything: an edge is a module-level import of a
model module (an import under `if TYPE_CHECKING:` is for annotations only and runs never, so it is no edge).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# What model/ must not import: the packages and entry points above it.
ABOVE_MODEL = ("parallel", "data", "training", "sampling", "experiments", "configs", "train", "infer")
# `python -m model.hf`, `python -m model.quant`, `python -m model.gguf`, `python -m model.lora`: entry points, at the top of the import order
# though they live in model/ (nothing imports them).
ENTRY_POINTS = ("model.hf.__main__", "model.quant.__main__", "model.gguf.__main__", "model.lora.__main__")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules an import statement names (`from a import b` names a.b when that is a module, else a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package the module is in
        package = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports(root: pathlib.Path, package: str) -> dict[str, tuple[set[str], list[tuple[int, str]], set[str]]]:
    """module -> (modules it imports at module level, not under TYPE_CHECKING; (line, module) of every import
    inside a function or class; every module it imports anywhere) for each module of `package` under `root`."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    known = set(files)
    out = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        top, nested, everywhere = set(), [], set()

        def visit(body, where: str, module=module, is_package=is_package, top=top, nested=nested):
            """where: 'top' (module level), 'typing' (under TYPE_CHECKING) or 'local' (in a function or class)."""
            for node in body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = _imported(node, module, is_package, known)
                    everywhere.update(names)
                    if where == "top":
                        top.update(names)
                    elif where == "local":
                        nested.extend((node.lineno, name) for name in names)
                elif isinstance(node, ast.If) and where == "top" and _is_type_checking(node.test):
                    visit(node.body, "typing")
                    visit(node.orelse, "top")
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(node.body, "local")
                elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                    for field in ("body", "orelse", "finalbody"):
                        visit(getattr(node, field, []), where)
                    for handler in getattr(node, "handlers", []):
                        visit(handler.body, where)

        tree = ast.parse(path.read_text(), str(path))
        visit(tree.body, "top")
        out[module] = (top, nested, everywhere)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports), as [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def problems(root: pathlib.Path, package: str = "model", entry_points=ENTRY_POINTS) -> list[str]:
    found = imports(root, package)
    inside = lambda name: name == package or name.startswith(package + ".")  # noqa: E731
    graph = {m: {n for n in top if inside(n) and n != m} for m, (top, _, _) in found.items() if m not in entry_points}
    out = []
    if cycle := find_cycle(graph):
        out.append("import circle: " + " -> ".join(cycle))
    for module, (_, nested, everywhere) in sorted(found.items()):
        if module in entry_points:
            continue
        out += [f"{module}:{line}: function-local import of {name}" for line, name in nested if inside(name)]
        out += [f"{module}: imports {name}" for name in sorted(everywhere) if name.split(".")[0] in ABOVE_MODEL]
    return out


def test_model_imports_run_one_way():
    assert problems(REPO) == []


def test_the_graph_is_what_the_modules_say():
    """The reader sees the edges that matter: config imports the tables, the kinds import config only for type
    checking, the transformer's blocks come from model.block, and its extra heads from model.heads."""
    found = imports(REPO, "model")
    assert {"model.kinds", "model.mtp"} <= found["model.config"][0]
    for kind in ("model.gqa", "model.mla", "model.moe", "model.mtp", "model.block", "model.attention"):
        assert "model.config" not in found[kind][0] and "model.config" in found[kind][2], kind
    assert "model.block" in found["model.transformer"][0] and "model.block" in found["model.mtp"][0]
    for user in ("model.transformer", "model.accounting"):  # they reach MTP only through the extra heads' table
        assert "model.heads" in found[user][0] and "model.mtp" not in found[user][2], user


def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, want",
    [
        ({"a.py": "from pkg import b\n", "b.py": "from pkg.c import x\n", "c.py": "import pkg.a\n"}, "import circle"),
        ({"a.py": "from . import b\n", "b.py": "from .a import x\n"}, "import circle: pkg.a -> pkg.b -> pkg.a"),
        ({"a.py": "def f():\n    from pkg import b\n", "b.py": "import pkg.a\n"}, "pkg.a:2: function-local import"),
        ({"a.py": "import training.loop\n"}, "pkg.a: imports training.loop"),
        ({"a.py": "if TYPE_CHECKING:\n    from parallel import x\n"}, "pkg.a: imports parallel"),
    ],
)
def test_the_check_fails_where_it_should(tmp_path, files, want):
    root = _package(tmp_path, {"pkg/__init__.py": "", **{f"pkg/{k}": v for k, v in files.items()}})
    found = problems(root, "pkg", entry_points=())
    assert any(p.startswith(want) for p in found), found


def test_imports_under_type_checking_are_no_edges(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from typing import TYPE_CHECKING\nimport pkg.b\n",
            "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.a import A\n",
        },
    )
    assert problems(root, "pkg") == []
