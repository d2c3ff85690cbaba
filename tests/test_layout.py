"""The package's layout rules: the run folder's file names live in one module (rundir.py), and the modules
import each other downwards only (no cycles)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medlora"
RUN_FOLDER_NAMES = {  # name -> how it shows in a string literal
    "config.yaml": r"config\.yaml", "run_info.json": r"run_info\.json", "metrics.json": r"metrics\.json",
    "base_eval.json": r"base_eval\.json", "adapter": r"(^|/)adapter(/|$)", "merged_model": r"merged_model",
    "checkpoint-": r"checkpoint-", "medlora_complete.json": r"medlora_complete\.json",
    "trainer_state.json": r"trainer_state\.json", "loss_curve.png": r"loss_curve\.png",
}


def string_literals(path: Path) -> list[str]:
    """Every string constant in a module's code (docstrings and comments are prose, not names in use)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_each_run_folder_file_name_appears_in_exactly_one_module():
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 15
    for name, pattern in RUN_FOLDER_NAMES.items():
        owners = [str(m.relative_to(SRC)) for m in modules
                  if any(re.search(pattern, s) for s in string_literals(m))]
        assert owners == ["rundir.py"], f"{name!r} is spelled out in {owners}"


def imports_of(path: Path) -> set[str]:
    """The medlora modules a module imports (relative imports resolved)."""
    package = ".".join(("medlora", *path.relative_to(SRC).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("medlora"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("medlora"))
    return found


def test_no_import_cycles():
    modules = {".".join(("medlora", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}

    def visit(node, stack):
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        for nxt in graph[node]:
            if not nxt.startswith(node + "."):  # a package importing its own submodules is not a cycle
                visit(nxt, [*stack, node])

    for name in graph:
        visit(name, [])
