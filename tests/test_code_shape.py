"""Code a newcomer can change safely (issue 11): no function in the runner over 60 lines, and
the layering that keeps planning free of the training stack (the planner never imports the
API or the runner)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qplan"


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", sorted((PKG / "runner").glob("*.py")), ids=lambda p: p.name)
def test_no_runner_function_over_60_lines(path):
    long = [(name, n) for name, n in _functions(path) if n > 60]
    assert not long, f"{path.name}: split these: {long}"


@pytest.mark.parametrize("path", sorted((PKG / "planner").glob("*.py")), ids=lambda p: p.name)
def test_the_planner_imports_neither_the_api_nor_the_runner(path):
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    bad = {m for m in names if m == "qplan.api" or m.startswith(("qplan.runner", "qplan.commands",
                                                                  "torch", "transformers"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"
