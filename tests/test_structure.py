"""How the repository reads: imports flow one way, lines stay short, the pipeline runs once."""

import ast
import subprocess
import sys

import pytest

import train
from conftest import REPO, TINY
from runtime import UsageError

PROJECT_MODULES = {path.stem: path for path in REPO.glob("*.py")}
LIBRARY = {"fpo", "model", "sae", "data", "runtime", "config", "report"}


def project_imports(module: str) -> tuple[set[str], set[str]]:
    """(project modules imported at the top level, those imported inside a function)."""
    tree = ast.parse(PROJECT_MODULES[module].read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        (top if node in tree.body else nested).update(names & set(PROJECT_MODULES))
    return top, nested


def test_imports_flow_one_way_with_no_circle_and_no_lazy_import():
    graph = {}
    for module in PROJECT_MODULES:
        top, nested = project_imports(module)
        assert not nested, f"{module}.py imports {nested} inside a function"
        graph[module] = top

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in graph[start]
        )

    for module in graph:
        assert not reaches(module, module, {module}), f"{module}.py imports itself back"
    assert "train" not in graph["evaluate"]
    assert not any("experiments" in imported for imported in graph.values())
    for library in LIBRARY:
        assert graph[library] <= LIBRARY, f"{library}.py imports {graph[library] - LIBRARY}"


def test_report_imports_only_the_standard_library():
    tree = ast.parse((REPO / "report.py").read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names), imported


def test_no_line_over_100_characters_in_any_top_level_python_file():
    long_lines = [
        f"{path.name}:{number}"
        for path in PROJECT_MODULES.values()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if len(line) > 100
    ]
    assert not long_lines, long_lines


def test_python_train_py_executes_train_py_once(tmp_path):
    """Run as a script up to its first stage (which stops: no gpt.pt), then ask whether any
    module imported train.py a second time, as `train`."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', *{TINY!r}, '--stage', 'sae', '--out_dir', {str(tmp_path)!r}]\n"
        "try:\n"
        "    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as exited:\n"
        "    print('exit', exited.code)\n"
        "print('train imported again:', 'train' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "gpt.pt not found" in done.stderr, done.stderr
    assert done.stdout.splitlines()[-2:] == ["exit 2", "train imported again: False"], done.stdout


@pytest.mark.parametrize("experiment", ["sweep", "compare", "head_to_head", "ablation", "control", "bound", "bench"])
def test_train_py_points_an_experiment_flag_to_experiments_py(experiment, no_training):
    with pytest.raises(UsageError, match=f"run `python experiments.py --{experiment}`"):
        train.main(TINY + [f"--{experiment}"])
