"""Every module of the package stays readable: at most 400 lines, and every function (method
included) under 60 lines. And the suite's longest files are collected first."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "brainseg_dist"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 59


def _modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE_DIR.parent)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_of_60_lines_or_more():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions of 60 lines or more: {long}"



def test_the_longest_files_are_collected_first():
    """conftest.LONGEST_FIRST names test files that exist; its hook puts their tests first,
    in its order, each file's tests still together and in their order."""
    from types import SimpleNamespace

    from conftest import LONGEST_FIRST, pytest_collection_modifyitems

    tests_dir = Path(__file__).resolve().parent
    assert [n for n in LONGEST_FIRST if not (tests_dir / n).is_file()] == []
    names = ["test_a.py", "test_cv.py", "test_cv.py", "test_b.py", "test_gpu_check.py",
             "test_a.py"]
    items = [SimpleNamespace(path=tests_dir / n, order=i) for i, n in enumerate(names)]
    pytest_collection_modifyitems(items)
    assert [(it.path.name, it.order) for it in items] == [
        ("test_gpu_check.py", 4), ("test_cv.py", 1), ("test_cv.py", 2), ("test_a.py", 0),
        ("test_b.py", 3), ("test_a.py", 5)]
