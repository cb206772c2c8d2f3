"""The layering the README's Development section draws, read from the source (imports inside
functions count too):

- packages are layered in the README's order: a module imports the package root's modules
  (errors, options) and modules of the packages listed above its own, never one below;
- inside a package, a module imports only the modules listed above it;
- only the rendering modules and the CLI import a UI library (rich, typer, click, matplotlib);
- every subpackage says in its `__init__` docstring what it owns, and the tests mirror the packages.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "randbp_cli"
TESTS = ROOT / "tests"
UI_LIBRARIES = {"rich", "typer", "click", "matplotlib"}
UI_MODULES = {"reports.tables", "reports.render", "reports.plots", "cli.common", "cli.console", "cli.usage", "cli.main"}


def _readme_tree() -> list[tuple[str, str]]:
    """(package, dotted module) in the README's order; the package is "" for the root's modules."""
    section = (ROOT / "README.md").read_text().split("## Development", 1)[1]
    listing = section.split("randbp_cli/\n", 1)[1].split("```", 1)[0]
    tree, package = [], ""
    for line in listing.splitlines():
        match = re.match(r"( +)(\w+)(/|\.py)", line)
        indent, name, kind = len(match.group(1)), match.group(2), match.group(3)
        if kind == "/":
            package = name
        else:
            tree.append(("" if indent == 2 else package, name if indent == 2 else f"{package}.{name}"))
    return tree


def _source_modules() -> set[str]:
    return {".".join(path.relative_to(PACKAGE).with_suffix("").parts) for path in PACKAGE.rglob("*.py")
            if not path.name.startswith("__")}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(randbp modules, top-level outside packages) that `module` imports anywhere in its source."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    here = module.split(".")[:-1]
    modules = _source_modules()
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from ..run import distributed` imports a module
                candidate = ".".join([*base, alias.name])
                inside.add(candidate if candidate in modules else ".".join(base))
        elif isinstance(node, ast.ImportFrom) and node.module:
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
    return inside - {""}, outside  # "": the package root's __init__ (__version__)


def test_readme_lists_every_module():
    assert sorted(module for _, module in _readme_tree()) == sorted(_source_modules())


def test_packages_import_only_packages_above_them():
    tree = _readme_tree()
    packages = list(dict.fromkeys(package for package, _ in tree))
    rank = {module: packages.index(package) for package, module in tree}
    upward = [f"{module} imports {dep}" for _, module in tree for dep in _imports(module)[0]
              if rank[dep] > rank[module]]
    assert not upward


def test_modules_import_only_modules_above_them_in_their_package():
    tree = _readme_tree()
    order = [module for _, module in tree]
    package_of = dict((module, package) for package, module in tree)
    upward = [f"{module} imports {dep}" for module in order for dep in _imports(module)[0]
              if package_of[dep] == package_of[module] and order.index(dep) > order.index(module)]
    assert not upward


def test_only_rendering_and_cli_import_ui_libraries():
    offenders = {module: sorted(_imports(module)[1] & UI_LIBRARIES) for _, module in _readme_tree()
                 if module not in UI_MODULES}
    assert not {module: libs for module, libs in offenders.items() if libs}


def test_every_subpackage_says_what_it_owns():
    packages = {package for package, _ in _readme_tree() if package}
    undocumented = [package for package in sorted(packages)
                    if len(ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or "") < 100]
    assert not undocumented


def test_tests_mirror_the_packages():
    """A test file sits in the folder of the package it tests (tests/<package>/), and every
    package has one; the tests of the whole (README, results, layout, CUDA) sit at the top."""
    packages = {package for package, _ in _readme_tree() if package}
    folders = {path.name for path in TESTS.iterdir() if path.is_dir() and any(path.glob("test_*.py"))}
    assert folders == packages
