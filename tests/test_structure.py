"""How the repository reads: imports flow one way, lines stay short, the pipeline runs once."""

import ast
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import TINY

PROJECT_MODULES = {path.stem: path for path in REPO.glob("*.py")}
LIBRARY = {"fpo", "model", "sae", "data", "runtime", "config", "loading"}


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


def test_no_line_over_100_characters_in_any_top_level_python_file():
    long_lines = [
        f"{path.name}:{number}"
        for path in PROJECT_MODULES.values()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if len(line) > 100
    ]
    assert not long_lines, long_lines


@pytest.mark.slow  # a subprocess that imports torch: 2-4 s
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


CARD = {"fpo", "model", "sae", "data", "train"}  # the design card's five files
SUPPORT = {"config", "runtime", "loading"}  # at most three, beside the card's and evaluate.py


def test_the_top_level_is_the_learners_core_and_stays_its_size():
    """The card's five files, evaluate.py and three support files: at most 3,600 lines in all,
    none over 700 (the anchors a learner compares with are 1,200 to 2,400)."""
    assert set(PROJECT_MODULES) == CARD | {"evaluate"} | SUPPORT
    lengths = {name: len(path.read_text().splitlines()) for name, path in PROJECT_MODULES.items()}
    assert sum(lengths.values()) <= 3600, lengths
    assert max(lengths.values()) <= 700, lengths


def test_fpo_py_imports_only_torch_and_the_standard_library():
    tree = ast.parse(PROJECT_MODULES["fpo"].read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "typing"}, imported


def test_one_function_turns_hidden_states_and_the_cache_into_d_and_both_trainers_call_it():
    trl_trainer = (REPO / "integrations" / "trl" / "fpo_trainer.py").read_text()
    for text in (PROJECT_MODULES["train"].read_text(), trl_trainer):
        assert "fpo.cached_feature_mse(" in text
        assert "pooled_topk_features(" not in text and "reference_pooled_features(" not in text
