"""experiments/profile.py: a cProfile summed into docs/cost.md's parts."""

import cProfile
import pstats

import pytest
import torch

import config
import data
from config import EvalConfig
from evaluate import sample_responses
from experiments import common, profile
from experiments.tests.helpers import tiny_reference
from model import GPT, GPTConfig
from tests.helpers import TINY


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


@pytest.mark.slow
def test_judging_inside_the_training_loop_counts_as_sampling_not_training(tiny_run, tmp_path):
    """The sweep judges inside train_policy's loop: that time is sampling, not training."""
    reference = tiny_reference(tiny_run, tmp_path)
    cfg = config.parse_args(TINY + ["--out_dir", str(reference), "--pref_steps", "4"])
    enc = data.load_tokenizer()
    sampled = []

    def judge(step, policy) -> bool:
        sampled.append(sample_responses(policy, [[5, 6, 7]] * 64, enc, EvalConfig(), seed=0,
                                        device=torch.device("cpu")))
        return True

    path = tmp_path / "judged.prof"
    with cProfile.Profile() as profiler:
        common.train_policy(cfg, torch.device("cpu"), 7, "lab", judge_every=2, judge=judge)
    profiler.dump_stats(path)
    total, seconds = profile.parts(str(path))
    assert len(sampled) == 2 and abs(sum(seconds.values()) - total) < 1e-9
    judging = pstats_seconds(path, "judged_in_place")
    assert 0 < seconds["sampling"] <= judging
    assert 0 < seconds["preference training"] <= pstats_seconds(path, "train_policy") - judging


def pstats_seconds(path, function: str) -> float:
    return sum(entry[3] for (_, _, name), entry in pstats.Stats(str(path)).stats.items()
               if name == function)
