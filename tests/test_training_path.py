"""The training and evaluation path checked against fpo.py's functions and the data's splits, on
a tiny random GPT and SAE built in memory (no pipeline run): fast, and direct."""

import copy

import pytest
import torch

import data
import evaluate
import fpo
import train
from config import Config, EvalConfig, PreferenceConfig, RunConfig, latent_weights
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
        weights=torch.tensor(latent_weights(pref_cfg.fpo_latent_weights, inputs.sae.d_sae)),
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
    # ... and each prompt's on-topic and positive fractions, as the experiments' intervals need
    assert sum(stats["positive"]) / 4 == stats["positive_rate"] and stats["positive"][2:] == [0, 0]
    assert sum(stats["on_topic"]) / 4 == stats["on_topic_rate"]


def test_fpo_latent_weights_scale_each_latent_s_term_of_d_and_not_which_latents_enter(world):
    """--fpo_latent_weights i:w multiplies latent i's squared difference by w in D(y); I(y) is
    chosen as without weights, so weight 0 drops a latent's term and leaves its top-k slot taken
    (the other latents' terms are exactly as before), and weights of 1 change nothing."""
    reference, inputs, _ = world
    policy = drifted_copy(reference, seed=3)
    rows, input_ids, mask = training_batch(inputs, n_pairs=6)
    _, hidden = policy(input_ids, hidden_layer=0)
    pooled = fpo.pooled_features(inputs.sae.encode(hidden), mask)
    reference_pooled = fpo.reference_pooled_features(inputs.cache, rows)
    union = fpo.top_activated(pooled, 2) | fpo.top_activated(reference_pooled, 2)  # I(y), k = 2
    terms = (pooled - reference_pooled).pow(2) * union  # (B, F): each latent's part of k * D(y)
    chosen = terms.sum(0).topk(3).indices.sort().values.tolist()  # latents whose terms count
    assert terms[:, chosen].sum() > 0
    uniform = PreferenceConfig(fpo_k=2)
    plain = training_feature_mse(inputs, hidden, mask, inputs.cache, rows, uniform)
    ones = PreferenceConfig(fpo_k=2, fpo_latent_weights=",".join(f"{i}:1" for i in chosen))
    assert torch.equal(training_feature_mse(inputs, hidden, mask, inputs.cache, rows, ones), plain)
    for weight in (0.0, 4.0):
        spec = ",".join(f"{i}:{weight:g}" for i in chosen)
        weighted_cfg = PreferenceConfig(fpo_k=2, fpo_latent_weights=spec)
        weighted = training_feature_mse(inputs, hidden, mask, inputs.cache, rows, weighted_cfg)
        expected = plain + (weight - 1.0) * terms[:, chosen].sum(-1) / 2
        torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-9)


def test_latent_weights_reads_the_flag_into_one_weight_per_latent():
    assert latent_weights("", 3) == [1.0, 1.0, 1.0]
    assert latent_weights("1:0,3:4.5", 5) == [1.0, 0.0, 1.0, 4.5, 1.0]
    for bad in ("1", "1:", "1:0,", "5:1", "1:1,1:2", "1:-1", "-1:1", "x:1"):
        assert latent_weights(bad, 5) == [], bad


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
