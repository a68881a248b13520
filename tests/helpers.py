"""Helpers the tests share: the tiny pipeline config, the numbers of a results dict, batches of a
counting pattern and preference files. The core's tests import this as `helpers`, the
experiments' tests as `tests.helpers` (as they import tests/pretend_device.py); fixtures stay in
the conftest.py files."""

import json
from pathlib import Path

import torch

import train

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


def finished_tiny_run(base_temp: Path) -> tuple[Path, list[str]]:
    """The tiny pipeline run to the end in base_temp/tiny_run: (out_dir, its argv). The core's
    and the experiments' `tiny_run` fixtures both pass the session's base temporary directory,
    so the run is made once a session (its eval stage writes results.json last)."""
    out_dir = base_temp / "tiny_run"
    argv = TINY + ["--out_dir", str(out_dir)]
    if not (out_dir / "results.json").exists():
        train.main(argv)
    return out_dir, argv


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


GOOD_ROW = {
    "prompt": "review the soup :", "chosen": " the soup was great .",
    "rejected": " the soup was awful .",
}


def jsonl(*rows) -> bytes:
    return b"".join(
        (row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows
    )


def counting_batches(n_batches, seed=1):
    g = torch.Generator().manual_seed(seed)
    # each row counts up by one from a random start, mod 32; (8, 16) per batch
    return [
        (torch.randint(32, (8, 1), generator=g) + torch.arange(16)) % 32 for _ in range(n_batches)
    ]
