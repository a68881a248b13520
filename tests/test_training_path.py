"""The training and evaluation path checked against fpo.py's functions and the data's splits, on
a tiny random GPT and SAE built in memory (no pipeline run): fast, and direct."""

import copy

import pytest
import torch

import data
import evaluate
import fpo
import train
from config import Config, EvalConfig, PreferenceConfig, RunConfig, latent_list
from model import GPT, GPTConfig
from sae import train_sae

CPU = torch.device("cpu")
FPO_K = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(reference GPT, PreferenceInputs with its cache, cfg): 12 training and 6 held-out pairs."""
    torch.manual_seed(0)
    enc = data.load_tokenizer()
    gpt_config = GPTConfig(vocab_size=enc.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32)
    reference = GPT(gpt_config)
    reference.eval().requires_grad_(False)
    activations = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    sae = train_sae(activations, d_sae=64, k=4, steps=5, batch_size=256, log_every=1000)
    sae.eval().requires_grad_(False)
    train_pairs = train.tokenize(data.make_preference_pairs(12, seed=0), enc, 48, "training")
    test_pairs = train.tokenize(
        data.make_preference_pairs(6, seed=0, split="test"), enc, 48, "held-out"
    )
    inputs = train.PreferenceInputs(enc, sae, train_pairs, test_pairs, cache={}, made_from={})
    cfg = Config(run=RunConfig(out_dir=str(tmp_path_factory.mktemp("world"))))
    cfg.sae.sae_layer = 0
    inputs.cache = train.build_cache(cfg, reference, inputs, made_from={}, device=CPU)
    return reference, inputs, cfg


def drifted_copy(model: GPT, seed: int) -> GPT:
    """A copy of the model with every weight nudged: a policy after some training."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy


def training_batch(inputs, n_pairs: int):
    """The first n_pairs training pairs as one batch: (cache rows, input_ids, response_mask)."""
    eos = data.eos_id(inputs.enc)
    return data.pair_batch(inputs.train_pairs, torch.arange(n_pairs), row_offset=0, eos_id=eos,
                           device=CPU)


def training_feature_mse(inputs, hidden, mask, cache, rows, pref_cfg):
    """D(y) exactly as train.preference_losses computes it for FPO."""
    return fpo.cached_feature_mse(
        hidden, mask, inputs.sae.encode_topk, cache, rows, pref_cfg.fpo_k,
        latents=latent_list(pref_cfg.fpo_latents),
    )


def test_cached_feature_mse_equals_fpo_functions_on_dense_codes(world):
    """fpo.cached_feature_mse, as training calls it, encodes only the generating positions and
    pools sparsely: the same D(y) as fpo.pooled_features of the dense codes of every position,
    shifted by one."""
    reference, inputs, _ = world
    policy = drifted_copy(reference, seed=1)
    rows, input_ids, mask = training_batch(inputs, n_pairs=6)
    _, hidden = policy(input_ids, hidden_layer=0)
    pref_cfg = PreferenceConfig(fpo_k=FPO_K)
    trained = training_feature_mse(inputs, hidden, mask, inputs.cache, rows, pref_cfg)
    dense_pooled = fpo.pooled_features(inputs.sae.encode(hidden), mask)
    reference_pooled = fpo.reference_pooled_features(inputs.cache, rows)
    expected = fpo.feature_mse(dense_pooled, reference_pooled, FPO_K)
    assert expected.min() > 0  # the policy has drifted: a wrong position would show
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-9)


def test_fpo_reference_term_is_the_cached_average_log_prob(world):
    """A policy equal to the reference has FPO rewards beta * (avg_logp - avg_logp_ref) = 0 and
    D(y) = 0 on every training pair; a reward read from the summed log-probs would not be 0."""
    reference, inputs, cfg = world
    batch = training_batch(inputs, n_pairs=12)
    pref_cfg = PreferenceConfig(method="fpo", fpo_k=FPO_K)
    result = train.preference_losses(pref_cfg, 0, reference, batch, inputs, reference=None)
    assert result.chosen_rewards.abs().max() < 1e-5
    assert result.rejected_rewards.abs().max() < 1e-5
    assert result.feature_mses.abs().max() < 1e-10
    # and with the policy moved, the reward is beta times the change of the average log-prob
    policy = drifted_copy(reference, seed=2)
    moved = train.preference_losses(pref_cfg, 0, policy, batch, inputs, reference=None)
    logits, _ = policy(batch[1])
    sum_logps, n_tokens = fpo.sequence_logps(logits, batch[1], batch[2])
    reference_avg = inputs.cache["sum_logps"] / inputs.cache["n_tokens"]
    expected = pref_cfg.beta * (sum_logps / n_tokens - reference_avg[batch[0]])
    torch.testing.assert_close(moved.chosen_rewards, expected[:12], rtol=1e-5, atol=1e-6)


def test_held_out_metrics_read_the_held_out_rows_of_the_cache(world):
    """The held-out pairs sit after the training pairs in the cache: a policy equal to the
    reference has zero D(y) and zero rewards there, so no pair is ranked correctly."""
    reference, inputs, _ = world
    pref_cfg = PreferenceConfig(method="fpo", fpo_k=FPO_K)
    metrics = train.held_out_accuracy(pref_cfg, 0, reference, reference, inputs, CPU)
    assert metrics["feature_mse"] < 1e-10
    assert metrics["reward_accuracy"] == 0.0  # every reward is 0: chosen > rejected never holds
    assert metrics["implicit_reward_accuracy"] == 0.0


@pytest.mark.parametrize("split", ["test", "validation"])
def test_the_judged_prompts_are_the_eval_splits_and_no_training_noun_appears(world, split):
    _, inputs, _ = world
    cfg = Config(eval=EvalConfig(eval_split=split, n_eval_prompts=0))
    prompts, judged = train.held_out_prompts(cfg, inputs)
    assert judged
    assert sorted(prompts) == sorted(data.split_prompts(split))
    training_nouns = {noun for nouns in data.split_nouns("train").values() for noun in nouns}
    assert not any(word in training_nouns for prompt in prompts for word in prompt.split())
    some = Config(eval=EvalConfig(eval_split=split, n_eval_prompts=5))
    assert set(train.held_out_prompts(some, inputs)[0]) <= set(prompts)


def test_judge_stats_average_over_every_response():
    """Two valid responses and two invalid ones (one off the grammar, one cut off before EOS):
    valid rate 2/4, and scores kept per prompt in order."""
    enc = data.load_tokenizer()
    eos = data.eos_id(enc)
    prompts = ["review the soup :", "review the soup :", "review the soup :", "review the soup :"]
    responses = [
        data.encode(enc, " the soup was great .") + [eos],
        data.encode(enc, " the soup was awful .") + [eos],
        data.encode(enc, " soup soup the .") + [eos],
        data.encode(enc, " the soup was great ."),  # no EOS: cut off
    ]
    stats = evaluate.judge_stats(prompts, responses, enc)
    assert stats["valid_rate"] == 0.5
    assert stats["scores"][2:] == [0.0, 0.0]
    assert stats["scores"][0] > stats["scores"][1] > 0.0
    assert stats["judge_score"] == sum(stats["scores"]) / 4
    assert stats["positive_rate"] == 0.25


def test_fpo_latents_restrict_d_to_the_chosen_set(world):
    """D(y) over --fpo_latents is feature_mse of those columns alone: changing the cached
    reference codes of every other latent leaves it as it was."""
    reference, inputs, _ = world
    policy = drifted_copy(reference, seed=3)
    rows, input_ids, mask = training_batch(inputs, n_pairs=6)
    _, hidden = policy(input_ids, hidden_layer=0)
    pooled = fpo.pooled_features(inputs.sae.encode(hidden), mask)
    reference_pooled = fpo.reference_pooled_features(inputs.cache, rows)
    chosen = pooled.abs().sum(0).topk(5).indices.sort().values.tolist()  # latents that fire
    pref_cfg = PreferenceConfig(fpo_k=2, fpo_latents=",".join(map(str, chosen)))
    subset = training_feature_mse(inputs, hidden, mask, inputs.cache, rows, pref_cfg)
    expected = fpo.feature_mse(pooled[:, chosen], reference_pooled[:, chosen], k=2)
    assert expected.max() > 0
    torch.testing.assert_close(subset, expected, rtol=1e-5, atol=1e-9)
    others = torch.ones(inputs.sae.d_sae, dtype=torch.bool)
    others[chosen] = False
    changed_cache = dict(inputs.cache)
    entries = others[inputs.cache["feature_indices"].long()]
    changed_cache["feature_values"] = inputs.cache["feature_values"] + 5.0 * entries
    again = training_feature_mse(inputs, hidden, mask, changed_cache, rows, pref_cfg)
    assert torch.equal(again, subset)
    all_latents = PreferenceConfig()  # the control: with every latent, the change shows
    before = training_feature_mse(inputs, hidden, mask, inputs.cache, rows, all_latents)
    after = training_feature_mse(inputs, hidden, mask, changed_cache, rows, all_latents)
    assert not torch.equal(before, after)


def test_fpo_kl_is_fpo_loss_with_seqkl_in_place_of_d(world):
    reference, inputs, _ = world
    policy = drifted_copy(reference, seed=4)
    batch = training_batch(inputs, n_pairs=12)
    rows, input_ids, mask = batch
    pref_cfg = PreferenceConfig(method="fpo_kl", beta=2.0, alpha=3.0)
    result = train.preference_losses(pref_cfg, 0, policy, batch, inputs, reference)
    # by hand: the length-normalised log-ratio, the cached margin, SeqKL(ref || policy) per row
    logits, _ = policy(input_ids)
    reference_logits, _ = reference(input_ids)
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    reference_logps = torch.log_softmax(reference_logits[:, :-1], dim=-1)
    token_kl = (reference_logps.exp() * (reference_logps - logps)).sum(-1) * mask[:, 1:]
    seq_kl = token_kl.sum(-1)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)
    ratio = sum_logps / n_tokens - inputs.cache["avg_logps"][rows]
    logit = 2.0 * (ratio[:12] - ratio[12:]) - 3.0 * (2.0 * seq_kl[12:] - 2.0 * seq_kl[:12])
    torch.testing.assert_close(result.losses, -torch.nn.functional.logsigmoid(logit))
    assert seq_kl.min() > 0 and result.feature_mses is None
