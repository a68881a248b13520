"""experiments/profile.py: a cProfile summed into docs/cost.md's parts."""

import cProfile

import torch

import data
from config import EvalConfig
from evaluate import sample_responses
from experiments import profile
from model import GPT, GPTConfig


def test_the_parts_add_up_to_the_profile_and_sampling_is_found(tmp_path):
    enc = data.load_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16))
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12]]
    eval_cfg = EvalConfig(max_new_tokens=8)
    path = tmp_path / "sampling.prof"
    with cProfile.Profile() as profiler:
        sample_responses(model.eval(), prompts, enc, eval_cfg, seed=0, device=torch.device("cpu"))
    profiler.dump_stats(path)
    total, seconds = profile.parts(str(path))
    assert list(seconds) == [*profile.PARTS, "the rest"]
    assert abs(sum(seconds.values()) - total) < 1e-9
    assert 0 < seconds["sampling"] <= total
    others = [part for part in profile.PARTS if part != "sampling"]
    assert all(seconds[part] == 0 for part in others)
