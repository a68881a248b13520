"""Shared fixtures: a tiny pipeline config that runs end to end in seconds on the CPU."""

import pytest

import train

# Every stage, shrunk: a 1-block 32-wide GPT, a 128-latent SAE, a few hundred pairs.
TINY = [
    "--device", "cpu", "--log_every", "10",
    "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "48",
    "--n_docs", "600", "--pretrain_steps", "120", "--pretrain_batch_size", "16", "--pretrain_lr", "3e-3",
    "--d_sae", "128", "--sae_k", "4", "--sae_tokens", "6000", "--sae_eval_tokens", "2000",
    "--sae_steps", "60", "--sae_batch_size", "256",
    "--n_pairs", "200", "--n_test_pairs", "40", "--pref_steps", "30", "--pref_batch_size", "8", "--pref_lr", "1e-3",
    "--n_eval_prompts", "24", "--max_new_tokens", "24",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny `python train.py` run: (out_dir, its argv)."""
    out_dir = tmp_path_factory.mktemp("tiny_run")
    argv = TINY + ["--out_dir", str(out_dir)]
    train.main(argv)
    return out_dir, argv
