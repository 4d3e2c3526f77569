"""Layers point one way: every import in the package goes down the stage order (docs/ARCHITECTURE.md).

    ground (errors, records, _shipped) <- data <- models <- compression <- engine <- search <- tracking
    <- export <- cli

A module may import its own stage and any stage beneath it, never one above; and tracking, though
above search, never imports it (both read trials as `records.TrialRecord`; the search hands them to
its callbacks, the CLI attaches the MLflow one). Every `.py` file under
autorank/ is parsed, and every import counts: function-local ones, those under TYPE_CHECKING and
relative ones alike. `autorank/__init__.py` (the lazy top-level verbs) and `autorank/__main__.py` sit
above every stage and may import anything; nothing else may import the top-level package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autorank"
GROUND = ("errors", "records", "_shipped")
STAGES = ("data", "models", "compression", "engine", "search", "tracking", "export", "cli")
TOP = len(STAGES) + 1  # autorank/__init__.py and __main__.py
APART = {("tracking", "search")}  # (importer, imported): siblings over the records, whatever the order


def level(module: str) -> int:
    """The stage rank of a dotted module name under autorank (0: ground; TOP: the package itself)."""
    parts = module.split(".")
    if parts[0] != "autorank":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return TOP
    if parts[1] in GROUND:
        return 0
    if parts[1] in STAGES:
        return STAGES.index(parts[1]) + 1
    raise AssertionError(f"{module}: not in a stage; add it to GROUND or STAGES (and docs/ARCHITECTURE.md)")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, root: Path) -> list[str]:
    """The autorank modules an import statement loads (a `from X import y` may load X.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolved against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    names = [source]
    for alias in node.names:  # `from autorank import engine` loads autorank.engine, not just the package
        candidate = root.parent.joinpath(*f"{source}.{alias.name}".split("."))
        if candidate.is_dir() or candidate.with_suffix(".py").is_file():
            names.append(f"{source}.{alias.name}")
    if len(names) > 1 and source.count(".") == 0:
        names.remove(source)  # `from autorank import engine`: the submodule is what it imports
    return names


def violations(root: Path = PACKAGE) -> list[str]:
    """'file:line: module (stage) imports target (stage)' for every import against the stage order."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        own = level(module if path.name != "__main__.py" else "autorank.__main__")
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in imported(node, module, path.name == "__init__.py", root):
                if target.split(".")[0] != "autorank":
                    continue
                pair = (module.split(".")[1:2] or [""])[0], (target.split(".")[1:2] or [""])[0]
                if level(target) > own or (level(target) == TOP and own != TOP) or pair in APART:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {module} imports {target}")
    return found


def test_every_import_points_down_the_stage_order():
    assert violations() == []


def test_every_module_belongs_to_a_stage():
    for path in PACKAGE.rglob("*.py"):
        level(module_name(path, PACKAGE) if path.name != "__main__.py" else "autorank.__main__")


@pytest.mark.parametrize(("where", "source", "bad"), [
    ("compression/x.py", "from autorank.engine import evaluate\n", True),
    ("compression/x.py", "def f():\n    from autorank import engine\n", True),      # function-local, from-package
    ("tracking/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from autorank.search import run\n",
     True),                                                                             # type-only counts too
    ("records.py", "import autorank.data\n", True),                                     # ground imports no stage
    ("search/x.py", "import autorank\n", True),                                         # nor the lazy top level
    ("data/x.py", "from ..models import create_model\n", True),                         # relative
    ("tracking/x.py", "from autorank.search.results import read_info\n", True),          # apart from search
    ("export/x.py", "from autorank.search.results import rebuild_trial\n", False),
    ("compression/x.py", "from .plan import Plan\nfrom autorank.errors import AutorankError\n", False),
    ("cli/x.py", "from autorank.export import export_onnx\n", False),
])
def test_the_check_catches_an_upward_import(tmp_path, where, source, bad):
    root = tmp_path / "autorank"
    for stage in STAGES:
        (root / stage).mkdir(parents=True)
        (root / stage / "__init__.py").write_text("")
    for name in GROUND:
        (root / f"{name}.py").write_text("")
    (root / "__init__.py").write_text("import importlib\n")
    (root / where).write_text(source)
    assert bool(violations(root)) == bad, violations(root)
