"""Every stage of the demo on a tiny random Llama (conftest.tiny_llama), offline, in seconds."""

import subprocess
import sys

import pytest
import torch
from datasets import Dataset

import demo
import fpo
import sentiment
import smollm2
from conftest import tiny_config
from fpo_trainer import REFERENCE_COLUMNS
from runtime import UsageError


@pytest.fixture(scope="module")
def made(tiny_llama, tokenizer, tmp_path_factory):
    """Stage 1 on the tiny Llama: (config, judge, pairs, sequences)."""
    cfg = tiny_config(tmp_path_factory.mktemp("demo"))
    judge = sentiment.Judge()
    prompts = sentiment.make_prompts("train", cfg.pairs.n_train_prompts, seed=0)
    pairs, sequences = demo.make_pairs(tiny_llama, tokenizer, judge, prompts, cfg)
    return cfg, judge, pairs, sequences


@pytest.fixture(scope="module")
def trained_sae(made, tiny_llama, tokenizer):
    """Stage 2 on the tiny Llama: (sae, metrics)."""
    cfg, _, _, sequences = made
    return demo.train_sae_stage(tiny_llama, sequences, tokenizer.pad_token_id, cfg)


def test_rank_pair_by_hand():
    """Chosen is the highest score, rejected the lowest, and a gap under min_gap gives None."""
    pair = sentiment.rank_pair("p", ["a", "b", "c"], [0.1, 0.8, -0.4], min_gap=0.5)
    assert (pair.chosen, pair.rejected) == ("b", "c")
    assert sentiment.rank_pair("p", ["a", "b", "c"], [0.1, 0.8, -0.4], min_gap=1.5) is None
    with pytest.raises(ValueError, match="at least 2"):
        sentiment.rank_pair("p", ["a"], [0.1], min_gap=0.0)


def test_judge_and_stats():
    """VADER calls a plainly positive review positive and a plainly negative one negative."""
    texts = ["A wonderful, lovely hotel.", "An awful, terrible tent."]
    good, bad = sentiment.Judge().compound(texts)
    assert good > 0.5 and bad < -0.5
    assert sentiment.sentiment_stats([good, bad]) == {"positive_rate": 0.5,
                                                      "mean_compound": (good + bad) / 2}


def test_splits_share_no_subject():
    """Train, validation and test prompts name disjoint subjects; every subject is in one split."""
    splits = {name: set(sentiment.split_subjects(name)) for name in ("train", "validation", "test")}
    assert not splits["train"] & splits["validation"]
    assert not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]
    assert set.union(*splits.values()) == set(sentiment.SUBJECTS)
    assert len(sentiment.make_prompts("test", 0, seed=0)) == 16 * len(sentiment.TEMPLATES)
    assert sentiment.make_prompts("train", 5, seed=3) == sentiment.make_prompts("train", 5, seed=3)


def test_pairs_are_made_and_ranked_by_the_judge(made, tokenizer):
    """Every prompt's samples are kept for the SAE; each pair's chosen completion scores at least
    its rejected one under VADER, and both are samples of that prompt."""
    cfg, judge, pairs, sequences = made
    assert len(sequences) == cfg.pairs.n_train_prompts * cfg.pairs.n_samples
    assert len(pairs) == cfg.pairs.n_train_prompts  # min_gap 0: every prompt gives a pair
    texts = {}
    for prompt_ids, completion in sequences:
        prompt = tokenizer.decode(prompt_ids)
        texts.setdefault(prompt, []).append(smollm2.completion_text(tokenizer, completion))
        assert 1 <= len(completion) <= cfg.pairs.max_new_tokens
    for pair in pairs:
        assert pair.prompt.startswith("<|im_start|>user\n")
        assert {pair.chosen, pair.rejected} <= set(texts[pair.prompt])
        chosen, rejected = judge.compound([pair.chosen, pair.rejected])
        assert chosen >= rejected == min(judge.compound(texts[pair.prompt]))


def test_too_few_pairs_is_a_usage_error(made, tiny_llama, tokenizer):
    """A gap no sample pair can reach leaves no pair: a clear error, not an empty training set."""
    cfg, judge, _, _ = made
    cfg.pairs.min_gap = 2.5
    try:
        with pytest.raises(UsageError, match="--min_gap"):
            demo.make_pairs(tiny_llama, tokenizer, judge, ["Review the tent."], cfg)
    finally:
        cfg.pairs.min_gap = 0.0


def test_residual_stream_lm_reads_and_patches_a_block(tiny_llama):
    """ResidualStreamLM returns block L's output (hidden_states[L + 1]) and the same logits as the
    model; an identity patch changes nothing, a zero patch changes the logits."""
    lm = smollm2.ResidualStreamLM(tiny_llama)
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_llama(input_ids=ids, output_hidden_states=True)
        logits, hidden = lm(ids, hidden_layer=-2)
        patched_logits, patched_hidden = lm(ids, hidden_layer=-2, hidden_patch=lambda h: h + 0)
        zero_logits, _ = lm(ids, hidden_layer=-2, hidden_patch=torch.zeros_like)
    assert torch.equal(hidden, out.hidden_states[3])
    assert torch.allclose(logits, out.logits, atol=1e-6)
    assert torch.allclose(patched_logits, logits, atol=1e-6)
    assert torch.equal(patched_hidden, hidden)
    assert not torch.allclose(zero_logits, logits, atol=1e-3)


def test_sae_trains_on_the_harvested_stream(trained_sae):
    """The SAE stage reports FVU, dead latents and CE recovered, and the SAE beats the mean."""
    sae, metrics = trained_sae
    assert sae.d_model == 32 and sae.d_sae == 64
    assert 0 <= metrics["fvu"] < 0.9
    assert 0 <= metrics["dead_fraction"] <= 1
    assert {"recovered", "ce_clean", "ce_sae", "l0"} <= set(metrics)
    assert not any(parameter.requires_grad for parameter in sae.parameters())


def test_train_top_blocks_freezes_the_rest(tiny_llama):
    """Only the top blocks' parameters train; the tied embedding and the final norm stay frozen."""
    model = type(tiny_llama)(tiny_llama.config)
    trained = smollm2.train_top_blocks(model, 2)
    top = ("model.layers.2.", "model.layers.3.")
    assert trained and all(name.startswith(top) for name in trained)
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.norm.weight.requires_grad


@pytest.fixture(scope="module")
def cached_pairs(made, trained_sae, tiny_llama, tokenizer):
    """Stage 3 on the tiny Llama: the pairs with FPO's reference columns."""
    cfg, _, pairs, _ = made
    return demo.build_cache_stage(tiny_llama, trained_sae[0], pairs, tokenizer, cfg,
                                  torch.device("cpu"))


def test_cache_holds_every_pair(cached_pairs, made):
    """One row per pair, each with its reference average log-prob and pooled SAE features."""
    _, _, pairs, _ = made
    assert len(cached_pairs) == len(pairs)
    assert set(REFERENCE_COLUMNS) <= set(cached_pairs.column_names)
    assert all(logp < 0 for logp in cached_pairs["ref_chosen_avg_logp"])
    assert all(len(indices) > 0 for indices in cached_pairs["ref_rejected_feature_indices"])


@pytest.mark.parametrize("method", demo.METHODS)
def test_each_method_trains_through_its_trainer(method, made, trained_sae, cached_pairs,
                                                tiny_llama, tokenizer):
    """Each method's trainer takes its steps: finite losses logged, and only the top blocks
    moved. FPO's first loss is log 2 (the policy is its own cached reference) and it logs D(y)."""
    cfg, _, _, _ = made
    run = demo.train_run(method, 1e-3, tiny_llama, trained_sae[0], cached_pairs, tokenizer, cfg,
                         torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in run["log"])
    assert run["seconds_per_step"] > 0
    base = dict(tiny_llama.named_parameters())
    assert set(run["weights"]) == {name for name in base if name.startswith(
        ("model.layers.2.", "model.layers.3."))}
    assert any(not torch.equal(value, base[name]) for name, value in run["weights"].items())
    if method == "fpo":
        assert run["log"][0]["loss"] == pytest.approx(fpo.fpo_loss(*[torch.zeros(1)] * 6)[0].item())
        assert "feature_mse/rejected" in run["log"][0]


def test_judge_model_scores_the_reference_against_itself(made, tiny_llama, tokenizer):
    """The reference judged against itself: KL 0, and every figure the results table shows."""
    cfg, judge, _, _ = made
    result = demo.judge_model(tiny_llama, tiny_llama, tokenizer, judge,
                              sentiment.make_prompts("test", 3, seed=0), cfg)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["reference_logp_per_token"] < 0
    assert 0 <= result["positive_rate"] <= 1 and 0 < result["distinct_2"] <= 1
    assert len(result["examples"]) == 3


def test_quick_changes_only_defaults():
    """--quick shrinks the settings left at their defaults; a flag given explicitly wins."""
    cfg = demo.parse_config(["--quick", "--steps", "5"])
    assert cfg.train.steps == 5
    assert cfg.pairs.n_train_prompts == demo.QUICK["n_train_prompts"]
    assert demo.parse_config([]).train.steps == demo.TrainSettings().steps


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be a finite number > 0"),
    (["--lrs", "1e-5,fast"], "--lrs must be comma-separated numbers"),
    (["--layer", "10"], "below the 4 trained blocks"),
    (["--n_samples", "1"], "--n_samples must be at least 2"),
    (["--method", "fpo"], "unknown option"),
])
def test_bad_flags_are_refused(flags, message):
    with pytest.raises(UsageError, match=message):
        demo.parse_config(flags)


def test_bad_flag_is_one_error_line_and_exit_2():
    """The command line's promise, in a process of its own: one `error:` line, exit code 2."""
    result = subprocess.run([sys.executable, "demo.py", "--steps", "-1"], capture_output=True,
                            text=True, timeout=120, cwd=demo.HERE)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --steps must be a finite number > 0, "
                                                  "got -1"]


def test_plain_pairs_go_to_trl_without_reference_columns(cached_pairs):
    """DPO and SimPO get the pairs as TRL reads them: prompt, chosen, rejected, nothing cached."""
    plain = demo.without_reference_columns(cached_pairs)
    assert plain.column_names == ["prompt", "chosen", "rejected"]
    assert isinstance(plain, Dataset)
