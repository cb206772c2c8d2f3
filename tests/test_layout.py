"""The layering the README's Development section draws: each module imports only modules listed
above it, and only the rendering and CLI modules import a UI library (read from the source, so
imports inside functions count too)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "randbp_cli"
UI_LIBRARIES = {"rich", "typer", "click", "matplotlib"}
UI_MODULES = {"tables", "render", "plots", "cli", "cli_options", "cli_console"}


def _readme_order() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Development", 1)[1]
    listing = section.split("randbp_cli/\n", 1)[1].split("```", 1)[0]
    return [re.match(r"\s+(\w+)\.py", line).group(1) for line in listing.splitlines() if line.strip()]


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(package modules, top-level outside packages) that `module` imports anywhere in its source."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            inside |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
    return inside - {"__version__"}, outside


def test_readme_lists_every_module():
    assert sorted(_readme_order()) == sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))


def test_modules_import_only_modules_above_them():
    order = _readme_order()
    upward = [f"{module} imports {dep}" for i, module in enumerate(order) for dep in _imports(module)[0]
              if dep not in order[:i]]
    assert not upward


def test_only_rendering_and_cli_import_ui_libraries():
    offenders = {module: sorted(_imports(module)[1] & UI_LIBRARIES) for module in _readme_order()
                 if module not in UI_MODULES}
    assert not {module: libs for module, libs in offenders.items() if libs}
