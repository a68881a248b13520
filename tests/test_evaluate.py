"""evaluate.py's metrics, against values worked out by hand."""

import copy
import math

import torch

import config
import data
import evaluate
import fpo
import train
from model import GPT, GPTConfig
from sae import train_sae

CPU = torch.device("cpu")


def tiny_gpt(enc, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)
    ).eval()


def test_distinct_2_hand_computed():
    # bigrams (1,2) (2,3) (1,2) (2,4): 3 distinct of 4
    assert evaluate.distinct_2([[1, 2, 3], [1, 2, 4]]) == 3 / 4
    assert evaluate.distinct_2([[7], []]) == 0.0  # no bigram at all


def test_kl_on_the_models_own_samples_averages_to_the_exact_kl_of_whole_responses():
    """Every response of 2 tokens over a 3-token vocabulary, each weighted by its probability under
    the policy: the estimator's expectation against KL(pi || pi_ref) enumerated over all 9
    responses."""
    torch.manual_seed(0)
    policy, reference = (
        GPT(GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=8)).eval()
        for _ in range(2)
    )
    with torch.no_grad():
        policy.lm_head.weight.mul_(30)  # sharpen the policy, so the two models differ clearly
    prompt, bos = [1], 0
    responses = [[a, b] for a in range(3) for b in range(3)]
    input_ids, mask = data.collate_responses([prompt] * 9, responses, bos)
    logp = fpo.sequence_logps(policy(input_ids)[0], input_ids, mask)[0].double()  # log pi(y), (9,)
    reference_logp = fpo.sequence_logps(reference(input_ids)[0], input_ids, mask)[0].double()
    # the 9 responses are every outcome
    assert math.isclose(logp.exp().sum().item(), 1.0, rel_tol=1e-5)
    exact_kl = (logp.exp() * (logp - reference_logp)).sum().item()
    per_response = torch.tensor([
        evaluate.score_samples(policy, reference, [prompt], [y], bos, CPU)["kl_from_reference"]
        for y in responses
    ])
    assert exact_kl > 0.1
    assert math.isclose((logp.exp() * per_response).sum().item(), exact_kl, rel_tol=1e-4)
    # per response it is a sum of KLs, never negative, unlike the log-ratio
    # log pi(y) - log pi_ref(y)
    assert (per_response >= 0).all() and (logp - reference_logp).min() < 0


def test_win_rate_counts_ties_half():
    # prompt 1 a win, prompt 2 a tie, prompt 3 a loss, prompt 4 a win: (1 + 0.5 + 0 + 1) / 4
    assert evaluate.win_rate([0.9, 0.1, 0.0, 0.55], [0.5, 0.1, 1.0, 0.1]) == 2.5 / 4


def test_a_response_cut_off_before_eos_is_invalid_even_after_a_full_stop():
    assert data.judge("review the soup :", " the soup was great .").valid
    cut = data.judge("review the soup :", " the soup was great .", complete=False)
    assert not cut.valid and cut.score == 0.0


def test_policy_and_reference_share_random_draws_in_sampling():
    enc = data.load_tokenizer()
    model = tiny_gpt(enc)
    prompts = [data.encode(enc, text) for text in data.make_prompts(6, seed=0)]
    settings = config.EvalConfig(temperature=1.0, top_k=0, max_new_tokens=8)
    first = evaluate.sample_responses(model, prompts, enc, settings, seed=3, device=CPU)
    assert evaluate.sample_responses(
        copy.deepcopy(model), prompts, enc, settings, seed=3, device=CPU
    ) == first
    assert evaluate.sample_responses(model, prompts, enc, settings, seed=4, device=CPU) != first


def test_score_samples_entropy_of_a_uniform_model_and_kl_to_itself():
    enc = data.load_tokenizer()
    model = tiny_gpt(enc)
    torch.nn.init.zeros_(model.lm_head.weight)  # every next-token distribution is uniform
    prompts, responses = [[5, 6], [7]], [[8, 9, data.eos_id(enc)], [10]]
    stats = evaluate.score_samples(model, model, prompts, responses, data.eos_id(enc), CPU)
    assert math.isclose(stats["entropy_per_token"], math.log(enc.n_vocab), rel_tol=1e-5)
    assert stats["kl_from_reference"] == 0.0


def test_fpo_and_simpo_losses_stay_float32_under_bfloat16_autocast_and_match_float32():
    """A bfloat16 policy (CUDA's autocast, here on the CPU) gives float32 D(y) and losses, close to
    float32's."""
    enc = data.load_tokenizer()
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32))
    sae = train_sae(
        torch.randn(2048, 32, generator=torch.Generator().manual_seed(0)), 64, 4,
        steps=20, batch_size=256, log_every=1000,
    )
    pairs, _ = data.tokenize_pairs(data.make_preference_pairs(8, seed=0), enc, 48)
    batch = data.pair_batch(pairs, torch.arange(8), 0, data.eos_id(enc), CPU)
    cache = fpo.build_reference_cache(
        lambda ids: policy(ids, hidden_layer=-1), sae.encode, [batch], n_rows=16, d_sae=64
    )
    inputs = train.PreferenceInputs(enc, sae, pairs, [], cache, {})
    with torch.no_grad():  # move the policy off the reference, so D(y) is not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    outputs = {}
    for method in ("fpo", "simpo"):
        pref = train.PreferenceConfig(method=method, fpo_k=8)
        exact = train.preference_losses(pref, -1, policy, batch, inputs, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = train.preference_losses(pref, -1, policy, batch, inputs, None)
        assert low[0].dtype == torch.float32, method
        torch.testing.assert_close(low[0], exact[0], rtol=0.05, atol=0.02)
        outputs[method] = exact, low
    # D(y) of every response
    exact_feature_mse, feature_mse = outputs["fpo"][0][3], outputs["fpo"][1][3]
    assert feature_mse.dtype == torch.float32 and exact_feature_mse.abs().max() > 0
    torch.testing.assert_close(feature_mse, exact_feature_mse, rtol=0.2, atol=2e-3)
