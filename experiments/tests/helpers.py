"""What the experiments' tests share: a tiny pipeline config, its first reference ready made, and
the command line as a subprocess. (A copy of tests/conftest.py's TINY: this package's tests
import nothing from the core's tests.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import train

REPO = Path(train.__file__).parent
DOCS = REPO / "docs"
PACKAGE = REPO / "experiments"

# Every stage, shrunk: a 1-block 32-wide GPT, a 128-latent SAE, a few hundred pairs.
TINY = [
    "--device", "cpu", "--log_every", "10",
    "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "48",
    "--n_docs", "600", "--pretrain_steps", "120", "--pretrain_batch_size", "16",
    "--pretrain_lr", "3e-3",
    "--d_sae", "128", "--sae_k", "4", "--sae_tokens", "6000", "--sae_eval_tokens", "2000",
    "--sae_steps", "60", "--sae_batch_size", "256",
    "--n_pairs", "200", "--n_test_pairs", "40", "--pref_steps", "30", "--pref_batch_size", "8",
    "--pref_lr", "1e-3",
    "--n_eval_prompts", "24", "--max_new_tokens", "24",
]
SVG = "{http://www.w3.org/2000/svg}"


def tiny_reference(tiny_run, out_dir: Path, seed: int = 1337) -> Path:
    """out_dir/ref_seed<seed>/ holding the tiny run's GPT, SAE and cache: the reference an
    experiment builds for that seed (the tiny run is seed 1337), ready made."""
    reference = out_dir / f"ref_seed{seed}"
    reference.mkdir(parents=True)
    for name in ("gpt.pt", "sae.pt", "reference_cache.pt"):
        shutil.copy(tiny_run[0] / name, reference / name)
    return reference


def numbers_of(results: dict) -> dict:
    """The numeric leaves of a results dict, for exact comparison; wall-clock seconds left out."""
    flat = {}
    for key, value in results.items():
        if key == "seconds":
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in numbers_of(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def read(path: Path):
    return json.loads(path.read_text())


def series_labels(svg: Path) -> list[str]:
    """The data-label of every series of an SVG chart, in order (report.svg_plot's groups)."""
    root = ElementTree.parse(svg).getroot()
    return [g.get("data-label") for g in root.iter(f"{SVG}g") if g.get("class") == "series"]


def run_module(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess from the repository root: its exit code and
    output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
