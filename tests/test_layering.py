"""The package's imports (read with ``ast``, lazy imports inside functions included) have no
cycle and never point against the layering.

Data flows data → preprocess → augment → model → train, and checkpoint → pipeline →
evaluate | export | predict, with the CLI on top. In import terms: a module may import
modules of lower layers, and modules of its own unit (a top-level module, or a subpackage such
as ``data`` or ``train``); never a module of a higher layer, nor another unit of its own layer
(so evaluate, export and predict stand on the pipeline and not on one another).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "brainseg_dist"
PACKAGE = "brainseg_dist"

# Lowest first. ``preprocess`` is a leaf (torch only) that every stage calls, decoding
# included, so in import terms it sits under ``data``. Training ends by exporting its best
# checkpoint, so ``train`` sits above ``export``.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("console", "io", "config"),
    ("preprocess",),
    ("data", "nifti"),
    ("augment",),
    ("model", "postprocess", "ema"),
    ("metrics", "viz", "tables", "model_card"),
    ("report",),
    ("checkpoint",),
    ("rundir",),
    ("pipeline",),
    ("ensemble", "onnx_export"),
    ("deployed",),
    ("nifti_predict",),
    ("evaluate", "export", "predict", "compare", "score"),
    ("train", "cv_eval"),
    ("cv",),
    ("cli",),
    # accelerate launch -m brainseg_dist.train / .cv; python -m brainseg_dist.cli
    ("train.__main__", "cv.__main__", "cli.__main__"),
]


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for every import of a package module, anywhere in the
    file. ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    edges = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            for target in targets:
                if target.startswith(PACKAGE + ".") and target != name:
                    edges.append((name, target, node.lineno))
    return edges


def unit(module: str) -> str:
    """The layering unit of a module: its top-level module or subpackage (``__main__``
    modules are units of their own)."""
    rest = module.removeprefix(PACKAGE + ".")
    return rest if rest.endswith("__main__") else rest.split(".")[0]


def layer(module: str) -> int:
    u = unit(module)
    for i, names in enumerate(LAYERS):
        if u in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layering.py; add it to LAYERS")


def wrong_way(edges: list[tuple[str, str, int]], modules: dict[str, Path]) -> list[str]:
    """Every import of a higher layer, or of another unit of the same layer."""
    bad = []
    for src, dst, line in edges:
        if unit(src) == unit(dst):
            continue
        if layer(dst) >= layer(src):
            rel = modules[src].relative_to(PACKAGE_DIR.parent)
            bad.append(f"{rel}:{line}: {src} imports {dst} "
                       f"({unit(src)} is layer {layer(src)}, {unit(dst)} layer {layer(dst)})")
    return bad


def cycles(edges: list[tuple[str, str, int]]) -> list[list[str]]:
    """Import cycles between modules (each reported once, from its smallest module)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges:
        graph.setdefault(src, set()).add(dst)
    found, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                cycle = [*path, nxt]
                key = frozenset(path)
                if key not in seen and min(path) == path[0]:
                    seen.add(key)
                    found.append(cycle)
            elif nxt not in path and nxt > path[0]:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_every_module_has_a_layer():
    for name in module_files():
        if name != PACKAGE:
            layer(name)


def test_no_import_cycle():
    modules = module_files()
    found = cycles(imports(modules))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_follow_the_layering():
    modules = module_files()
    bad = wrong_way(imports(modules), modules)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_check_sees_lazy_and_from_imports(tmp_path):
    """The parser finds imports inside functions and ``from pkg import module``."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("def f():\n    from brainseg_dist import train\n")
    (pkg / "train.py").write_text("import brainseg_dist.model\n")
    modules = module_files(pkg)
    edges = imports(modules)
    assert ("brainseg_dist.model", "brainseg_dist.train", 2) in edges
    assert cycles(edges) == [["brainseg_dist.model", "brainseg_dist.train",
                              "brainseg_dist.model"]]
