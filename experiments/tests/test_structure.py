"""How the package reads: it imports the core, never the reverse; its own imports flow one way,
none inside a function; lines stay short; its README names every module."""

import ast
import sys

from experiments.tests.helpers import PACKAGE, REPO

CORE = {path.stem for path in REPO.glob("*.py")}
MODULES = {path.stem: path for path in PACKAGE.glob("*.py")}


def imports_of(path) -> tuple[set[str], set[str]]:
    """(modules imported at the top level, those imported inside a function or class), as dotted
    names: `from experiments import report` -> experiments.report."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        else:
            continue
        (top if node in tree.body else nested).update(names)
    return top, nested


def package_imports(path) -> set[str]:
    """The package's modules a module imports at the top level: {"common", "report", ...}."""
    top, _ = imports_of(path)
    return {name.split(".")[1] for name in top
            if name.startswith("experiments.") and name.split(".")[1] in MODULES}


def test_nothing_at_the_top_level_imports_the_package():
    for name in CORE:
        top, nested = imports_of(REPO / f"{name}.py")
        assert not any(n.split(".")[0] == "experiments" for n in top | nested), name


def test_the_package_imports_the_core_the_standard_library_and_torch_only():
    """... and matplotlib, in figures.py alone (experiments/requirements.txt)."""
    allowed = CORE | set(sys.stdlib_module_names) | {"torch", "experiments"}
    for name, path in MODULES.items():
        top, nested = imports_of(path)
        assert not nested, f"experiments/{name}.py imports {nested} inside a function"
        plotting = {"matplotlib"} if name == "figures" else set()
        assert {n.split(".")[0] for n in top} <= allowed | plotting, name


def test_the_package_s_imports_flow_one_way():
    graph = {name: package_imports(path) for name, path in MODULES.items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in graph[start])

    for name in graph:
        assert not reaches(name, name, {name}), f"experiments/{name}.py imports itself back"
    # the bottom of the package: what the experiments share imports none of them
    assert graph["report"] == graph["stats"] == graph["settings"] == graph["figures"] == set()
    assert graph["common"] <= {"stats", "figures"}
    assert not any("__main__" in imported for imported in graph.values())


def test_no_line_over_100_characters_in_the_package_or_its_tests():
    paths = [*PACKAGE.glob("*.py"), *PACKAGE.glob("tests/*.py")]
    long_lines = [f"{path.relative_to(REPO)}:{number}"
                  for path in paths
                  for number, line in enumerate(path.read_text().splitlines(), 1)
                  if len(line) > 100]
    assert not long_lines, long_lines


def test_the_readme_names_every_module_and_test_file():
    readme = (PACKAGE / "README.md").read_text()
    for path in [*PACKAGE.glob("*.py"), *PACKAGE.glob("tests/test_*.py")]:
        if path.name != "__init__.py":
            assert f"{path.name}" in readme, path.name
