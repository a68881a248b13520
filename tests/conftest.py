"""Shared fixtures and helpers: a tiny pipeline config (helpers.py's TINY) that runs end to end
in seconds on the CPU.

Tests that train a tiny pipeline, start a subprocess or train a planted SAE are marked `slow`:
`python -m pytest -q -m "not slow"` is the quick edit loop, `python -m pytest -q` runs everything.
"""

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train
from helpers import finished_tiny_run, numbers_of

REPO = Path(train.__file__).parent
README = REPO / "README.md"
DOCS = REPO / "docs"

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny `python train.py` run: (out_dir, its argv)."""
    return finished_tiny_run(tmp_path_factory.getbasetemp())


def results_of(out_dir: Path) -> dict:
    return numbers_of(json.loads((out_dir / "results.json").read_text()))


def copy_outputs(tiny_run, tmp_path: Path, *names: str) -> Path:
    """A fresh out_dir holding copies of some of the tiny run's outputs (the tiny run stays
    untouched)."""
    out_dir, _ = tiny_run
    for name in names:
        shutil.copy(out_dir / name, tmp_path / name)
    return tmp_path


def readme_snippet() -> str:
    """The python block of README.md's "Use the loss in your own code"."""
    text = README.read_text()
    marker = text.index("<!-- snippet: tests/test_readme.py")
    return re.search(r"```python\n(.*?)```", text[marker:], flags=re.S).group(1)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in a subprocess: its exit code and output."""
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess: its exit code and output."""
    return run_script("train.py", *args)


# Every training stage's entry point, for `no_training`.
STAGE_FUNCTIONS = (
    (train, "pretrain"), (train, "train_sae_stage"), (train, "build_cache"),
    (train, "train_preference"), (train, "evaluate_policy"),
)


@pytest.fixture
def no_training(monkeypatch):
    """Every stage fails the test if it starts: faults must be found before any training."""
    for module, name in STAGE_FUNCTIONS:
        monkeypatch.setattr(
            module, name, lambda *args, _name=name, **kwargs: pytest.fail(f"{_name} ran")
        )


def run_main_as_script(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """train.py's `__main__` block in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    return exited.value.code, capsys.readouterr().err


def interrupt_at(step_to_stop: int):
    """Wrap a function called once per step with the step as its last argument: at that step,
    send this process a real SIGINT (Ctrl-C)."""
    def wrap(function):
        def wrapped(*args):
            if args[-1] == step_to_stop:
                os.kill(os.getpid(), signal.SIGINT)
            return function(*args)
        return wrapped
    return wrap
