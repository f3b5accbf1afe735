"""The layers import downwards only: model/ < data_pipeline/ < recipes/.

`model` (the architecture, checkpoints, conversion) imports neither `data_pipeline` nor
`recipes`; `data_pipeline` (tokenizer, chat format, datasets) does not import `recipes`.
What a lower layer needs of an upper one is handed in by the caller (the reward registry
to data_pipeline.rl_data) or lives in the lower layer (data_pipeline.math_answers,
data_pipeline.chat.prompt_ids, model.checkpoint.write_atomic).

Read from the source (no import runs): every import statement, those inside functions
included, and `importlib.import_module` / `__import__` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {"model": ("data_pipeline", "recipes"), "data_pipeline": ("recipes",)}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file of package `path.parent`."""
    package = path.parent.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from . import x` stays in the package: only the first level is checked
            found.append((node.lineno, package if node.level else node.module or ""))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def violations(package: str) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line} imports {module}"
            for path in sorted((REPO / package).rglob("*.py"))
            for line, module in imported_modules(path)
            if module.split(".")[0] in FORBIDDEN[package]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(package):
    assert violations(package) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "data_pipeline" / "x.py"
    source.parent.mkdir()
    source.write_text("import json\nfrom . import chat\n\ndef f():\n    from recipes.rewards import REWARDS\n"
                      "    import recipes.generate as g\n    return importlib.import_module('recipes.rl')\n")
    assert imported_modules(source) == [(1, "json"), (2, "data_pipeline"), (5, "recipes.rewards"),
                                        (6, "recipes.generate"), (7, "recipes.rl")]
