"""Fixtures of the experiments' tests: a tiny pipeline run, which each experiment takes as its
first reference, and guards that fail a test when training starts. Tests that train, run a
subprocess or signal one are marked `slow`."""

import importlib.util

import pytest
import torch

import train
from tests.helpers import finished_tiny_run

# The experiments draw with matplotlib (experiments/requirements.txt), which the core does not
# need: on a core-only install these tests are not collected, and the header says why.
if importlib.util.find_spec("matplotlib") is None:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header() -> str:
    if importlib.util.find_spec("matplotlib") is None:
        return ("experiments/tests: not run, matplotlib is missing "
                "(pip install -r experiments/requirements.txt)")
    return "experiments/tests: run (experiments/requirements.txt installed)"

# The stages an experiment may start, for `no_training`: train.py's, and every preference loop
# (train_preference and the experiments' own both begin with train.preference_models).
STAGE_FUNCTIONS = ("pretrain", "train_sae_stage", "build_cache", "preference_models",
                   "evaluate_policy")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny `python train.py` run: (out_dir, its argv), the core tests' own."""
    return finished_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def keep_thread_count():
    """main() sets this process's torch thread count (--threads); put it back after each test,
    as later tests compare against numbers made with the default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_training(monkeypatch):
    """Every stage fails the test if it starts: faults must be found before any training."""
    for name in STAGE_FUNCTIONS:
        monkeypatch.setattr(
            train, name, lambda *args, _name=name, **kwargs: pytest.fail(f"{_name} ran")
        )
