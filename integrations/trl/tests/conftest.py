"""Shared by the integration's tests: offline, one CPU thread, and the README's tested commands.

The README's block after TESTED_MARKER holds the exact commands a user runs; `readme_commands`
reads them back, and `demo` runs the first one (make_demo.py) once per test session.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Set before any test module imports transformers (which reads them once): no test may
# download, and the processes the tests start inherit these too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

HERE = Path(__file__).resolve().parents[1]  # integrations/trl
README = HERE / "README.md"
TESTED_MARKER = "<!-- tested by tests/test_fpo_trainer.py: keep these lines runnable -->"
# Tiny matrices: one thread is fastest, and far faster than two when other processes share
# the cores (two threads then wait on each other at every operation).
torch.set_num_threads(1)


def readme_commands() -> list[tuple[dict[str, str], list[str]]]:
    """The commands of the README's tested block: (environment variables, argv) each, with
    backslash-continued lines joined."""
    block = README.read_text().split(TESTED_MARKER)[1].split("```bash\n")[1].split("```")[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        n_env = next(i for i, word in enumerate(words) if "=" not in word)
        commands.append((dict(word.split("=", 1) for word in words[:n_env]), words[n_env:]))
    return commands


def run_readme_command(index: int, demo_dir: Path) -> subprocess.CompletedProcess:
    """README command `index` run as written, except out/demo becomes demo_dir."""
    env, argv = readme_commands()[index]
    argv = [sys.executable if word == "python" else word.replace("out/demo", str(demo_dir))
            for word in argv]
    result = subprocess.run(argv, cwd=HERE, env=os.environ | env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The tiny demo's folder, made by the README's make_demo.py command: model/, sae.pt,
    pairs.jsonl and heldout_pairs.jsonl."""
    demo_dir = tmp_path_factory.mktemp("out") / "demo"
    run_readme_command(0, demo_dir)
    return demo_dir
