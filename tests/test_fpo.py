"""The math of fpo.py, pinned against values written out by hand.

The values follow from the equations (README "The equations").
"""

import itertools
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fpo
import runtime

ROOT = Path(__file__).resolve().parent.parent


def nll_of_logit(x: float) -> float:
    """-log sigmoid(x), written out."""
    return math.log(1.0 + math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------- the losses


def test_fpo_loss_hand_computed():
    # chosen reward 0.1*(-1.0 - -1.5) = 0.05, rejected 0.1*(-2.0 - -1.5) = -0.05
    # constraint 0.5*(0.1*0.4 - 0.1*0.2) = 0.01  ->  logit 0.1 - 0.01 = 0.09
    losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
        t(-1.0),
        t(-2.0),
        t(-1.5),
        t(-1.5),
        t(0.2),
        t(0.4),
        beta=0.1,
        alpha=0.5,
    )
    assert math.isclose(losses.item(), nll_of_logit(0.09), rel_tol=1e-12)
    assert math.isclose(chosen_rewards.item(), 0.05, rel_tol=1e-12)
    assert math.isclose(rejected_rewards.item(), -0.05, rel_tol=1e-12)


def test_dpo_loss_hand_computed():
    # 2 * ((-10 - -12) - (-20 - -19)) = 2 * (2 + 1) = 6
    losses, chosen_rewards, rejected_rewards = fpo.dpo_loss(
        t(-10.0),
        t(-20.0),
        t(-12.0),
        t(-19.0),
        beta=2.0,
    )
    assert math.isclose(losses.item(), nll_of_logit(6.0), rel_tol=1e-12)
    assert math.isclose(chosen_rewards.item(), 4.0) and math.isclose(rejected_rewards.item(), -2.0)


def test_simpo_loss_hand_computed():
    # 2*(-1.2) - 2*(-1.5) - 0.5 = 0.1: gamma is not multiplied by beta
    losses, chosen_rewards, rejected_rewards = fpo.simpo_loss(t(-1.2), t(-1.5), beta=2.0, gamma=0.5)
    assert math.isclose(losses.item(), nll_of_logit(0.1), rel_tol=1e-9)
    assert math.isclose(chosen_rewards.item(), -2.4) and math.isclose(rejected_rewards.item(), -3.0)


def test_tdpo_losses_hand_computed():
    # DPO logit 0.1*((-10 - -11) - (-20 - -18)) = 0.3
    args = (t(-10.0), t(-20.0), t(-11.0), t(-18.0), t(0.5), t(2.0))
    tdpo1, _, _ = fpo.tdpo_loss(*args, beta=0.1, version=1)
    tdpo2, _, _ = fpo.tdpo_loss(*args, beta=0.1, alpha=0.5, version=2)
    assert math.isclose(tdpo1.item(), nll_of_logit(0.3 - 0.1 * (2.0 - 0.5)), rel_tol=1e-12)
    tdpo2_logit = 0.3 - 0.5 * (0.1 * 2.0 - 0.1 * 0.5)
    assert math.isclose(tdpo2.item(), nll_of_logit(tdpo2_logit), rel_tol=1e-12)


def test_rewards_are_detached_and_shapes_are_batch():
    policy_chosen = t(-1.0, -2.0, -3.0).requires_grad_()
    for losses, chosen_rewards, rejected_rewards in [
        fpo.fpo_loss(policy_chosen, t(-1, -1, -1), t(0, 0, 0), t(0, 0, 0), t(0, 0, 0), t(0, 0, 0)),
        fpo.dpo_loss(policy_chosen, t(-1, -1, -1), t(0, 0, 0), t(0, 0, 0)),
        fpo.simpo_loss(policy_chosen, t(-1, -1, -1)),
        fpo.tdpo_loss(policy_chosen, t(-1, -1, -1), t(0, 0, 0), t(0, 0, 0), t(0, 0, 0), t(0, 0, 0)),
    ]:
        assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (3,)
        assert losses.requires_grad
        assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_fpo_with_alpha_zero_is_length_normalised_dpo_with_offline_margin():
    gen = torch.Generator().manual_seed(0)
    avg_logps = -torch.rand(4, 8, generator=gen, dtype=torch.float64)
    mses = torch.rand(2, 8, generator=gen, dtype=torch.float64)
    fpo_losses, _, _ = fpo.fpo_loss(*avg_logps, *mses, beta=0.7, alpha=0.0)
    dpo_losses, _, _ = fpo.dpo_loss(*avg_logps, beta=0.7)  # DPO on averaged log-probs
    torch.testing.assert_close(fpo_losses, dpo_losses, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------- gradients


def gradient_of(loss_fn, index_of_term, *values, **kwargs):
    """d(sum of losses)/d(argument index_of_term), or zeros if it gets no gradient."""
    inputs = [t(*v).requires_grad_() for v in values]
    losses, _, _ = loss_fn(*inputs, **kwargs)
    losses.sum().backward()
    grad = inputs[index_of_term].grad
    return torch.zeros_like(inputs[index_of_term]) if grad is None else grad


def test_stop_gradient_on_the_chosen_feature_term():
    values = ([-1.0, -1.2], [-2.0, -1.1], [-1.5, -1.3], [-1.5, -1.0], [0.2, 0.7], [0.4, 0.1])
    assert torch.all(gradient_of(fpo.fpo_loss, 4, *values) == 0)  # chosen D(y_w): none
    rejected_grad = gradient_of(fpo.fpo_loss, 5, *values)
    assert torch.all(rejected_grad > 0)  # raising D(y_l) raises the loss: training pulls it down


def test_without_the_stop_gradient_d_chosen_gets_a_gradient_and_the_loss_is_the_same():
    values = ([-1.0, -1.2], [-2.0, -1.1], [-1.5, -1.3], [-1.5, -1.0], [0.2, 0.7], [0.4, 0.1])
    free = gradient_of(fpo.fpo_loss, 4, *values, stop_gradient=False)
    assert torch.all(free < 0)  # raising D(y_w) lowers the loss: training pushes it up
    # d loss / d D(y_w) = -sigmoid(-logit) * alpha * beta, the negative of D(y_l)'s
    torch.testing.assert_close(free, -gradient_of(fpo.fpo_loss, 5, *values, stop_gradient=False))
    tensors = [torch.tensor(v) for v in values]
    with_stop, *_ = fpo.fpo_loss(*tensors, stop_gradient=True)
    without, *_ = fpo.fpo_loss(*tensors, stop_gradient=False)
    assert torch.equal(with_stop, without)


def test_tdpo_chosen_kl_gradient_only_in_version_1():
    values = ([-10.0], [-20.0], [-11.0], [-18.0], [0.5], [2.0])
    assert torch.all(gradient_of(fpo.tdpo_loss, 4, *values, version=2) == 0)
    # -beta*(-KL_w) in the logit
    assert torch.all(gradient_of(fpo.tdpo_loss, 4, *values, version=1) < 0)
    assert torch.all(gradient_of(fpo.tdpo_loss, 5, *values, version=2) > 0)


def test_fpo_gradient_matches_finite_differences():
    values = [t(-1.0, -0.7), t(-2.0, -0.9), t(-1.5, -1.0), t(-1.5, -0.4), t(0.2, 0.3), t(0.4, 0.1)]
    for i in (0, 1, 5):

        def f(x, i=i):
            args = list(values)
            args[i] = x
            return fpo.fpo_loss(*args, beta=0.3, alpha=0.5)[0].sum()

        assert torch.autograd.gradcheck(f, (values[i].clone().requires_grad_(),))


# ---------------------------------------------------------------------------------- features


def test_feature_mse_union_of_different_top_k_sets():
    policy = t(3.0, 2.0, 1.0, 0.0, 0.0)[None]
    reference = t(0.0, 0.0, 0.5, 5.0, 4.0)[None]
    # top-2: policy {0, 1}, reference {3, 4}; feature 2 (diff 0.25) is in neither
    expected = (3.0**2 + 2.0**2 + 5.0**2 + 4.0**2) / 2
    assert math.isclose(fpo.feature_mse(policy, reference, k=2).item(), expected)
    # k = 3 adds feature 2 from the policy side, still divided by k
    assert math.isclose(fpo.feature_mse(policy, reference, k=3).item(), (54.0 + 0.25) / 3)


def test_feature_mse_docstring_example():
    # fpo.feature_mse's docstring example, value for value: keep the two in step
    policy = t(0.5, 0.0, 0.2, 0.0)[None]
    reference = t(0.0, 0.4, 0.1, 0.0)[None]
    # k = 1: I(y) = {0} U {1}; feature 2 (diff 0.1) is in neither top-1
    assert math.isclose(fpo.feature_mse(policy, reference, k=1).item(), 0.41, rel_tol=1e-12)
    # k = 2: I(y) = {0, 2} U {1, 2}, divided by k = 2, not by |I(y)| = 3
    assert math.isclose(fpo.feature_mse(policy, reference, k=2).item(), 0.21, rel_tol=1e-12)
    docstring = fpo.feature_mse.__doc__
    assert "policy_pooled    = [[0.5, 0.0, 0.2, 0.0]]" in docstring
    assert "reference_pooled = [[0.0, 0.4, 0.1, 0.0]]" in docstring
    assert "= (0.25 + 0.16) / 1 = 0.41" in docstring
    assert "D = (0.25 + 0.16 + 0.01) / 2 = 0.21" in docstring


def test_feature_mse_weights_scale_each_term_and_leave_i_y_as_it_is():
    policy = t(3.0, 2.0, 1.0, 0.0, 0.0)[None]
    reference = t(0.0, 0.0, 0.5, 5.0, 4.0)[None]
    # top-2: policy {0, 1}, reference {3, 4}; squared differences 9, 4, 0.25, 25, 16
    unweighted = fpo.feature_mse(policy, reference, k=2)
    assert torch.equal(fpo.feature_mse(policy, reference, k=2, weights=torch.ones(5)), unweighted)
    # w = (0, 1, 100, 2, 1): feature 0 dropped, feature 3 doubled; feature 2 stays outside I(y)
    # however heavy (the weights never choose which features enter), so 100 changes nothing
    weights = t(0.0, 1.0, 100.0, 2.0, 1.0)
    expected = (0 * 9.0 + 4.0 + 2 * 25.0 + 16.0) / 2
    assert math.isclose(fpo.feature_mse(policy, reference, k=2, weights=weights).item(), expected)
    # a weight of 0 leaves the feature's top-k slot taken: feature 2 does not move up into it
    drop_first = t(0.0, 1.0, 1.0, 1.0, 1.0)
    assert math.isclose(
        fpo.feature_mse(policy, reference, k=2, weights=drop_first).item(), (4.0 + 25.0 + 16.0) / 2
    )


def test_feature_mse_is_differentiable_in_the_policy():
    policy = t(3.0, 2.0, 1.0, 0.0).requires_grad_()
    fpo.feature_mse(policy[None], t(1.0, 0.0, 0.0, 0.0)[None], k=1).sum().backward()
    # union {0}: d/dp0 (p0 - 1)^2 / 1 = 2 * 2 = 4, nothing else selected
    torch.testing.assert_close(policy.grad, t(4.0, 0.0, 0.0, 0.0))


def test_feature_mse_top_k_ranges_over_activated_features_only():
    # k = 2. Policy's top-2 is {0, 1}; the reference has one active feature, 3, so it contributes
    # {3} alone. Feature 2 is active only on the policy and outside its top-2: not in I(y),
    # whatever its number (a top-2 padded with zeros could pick it up as a tie at 0).
    policy = t(3.0, 2.0, 1.0, 0.0, 0.0)
    reference = t(0.0, 0.0, 0.0, 4.0, 0.0)
    expected = (3.0**2 + 2.0**2 + 4.0**2) / 2  # feature 2's (1 - 0)^2 is not counted
    for permutation in itertools.permutations(range(5)):
        columns = list(permutation)
        feature_mse = fpo.feature_mse(policy[columns][None], reference[columns][None], k=2)
        assert feature_mse.item() == expected, columns
    # nothing active anywhere: D = 0
    assert fpo.feature_mse(torch.zeros(1, 5), torch.zeros(1, 5), k=2).item() == 0.0


def test_feature_mse_is_invariant_to_numbering_the_latents():
    gen = torch.Generator().manual_seed(0)
    B, F, k = 6, 40, 8
    # sparse non-negative pooled codes, some rows with fewer than k active features
    policy = torch.rand(B, F, generator=gen, dtype=torch.float64)
    policy = policy * (torch.rand(B, F, generator=gen) < 0.15)
    reference = torch.rand(B, F, generator=gen, dtype=torch.float64)
    reference = reference * (torch.rand(B, F, generator=gen) < 0.15)
    assert ((policy > 0).sum(dim=-1) < k).any() and ((reference > 0).sum(dim=-1) < k).any()
    drift = fpo.feature_mse(policy, reference, k)
    for _ in range(50):
        columns = torch.randperm(F, generator=gen)
        permuted = fpo.feature_mse(policy[:, columns], reference[:, columns], k)
        torch.testing.assert_close(permuted, drift, rtol=0, atol=1e-12)


def test_pooled_features_pool_the_positions_that_generate_the_response():
    # tokens 2, 3, 4 are the response, 5 is padding: positions 1, 2, 3 generate them (like
    # sequence_logps)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    for position in range(6):
        codes = torch.zeros(1, 6, 2, dtype=torch.float64)
        codes[0, position, 1] = 3.0
        pooled = fpo.pooled_features(codes, mask)
        expected = 1.0 if position in (1, 2, 3) else 0.0  # 3.0 / |y|, |y| = 3
        assert pooled[0].tolist() == [0.0, expected], position
    # position 4 holds the last response token itself, which generates nothing: never pooled


def test_pooled_features_docstring_example():
    # fpo.pooled_features' docstring example, value for value: keep the two in step
    response_mask = torch.tensor([[0, 0, 1, 1, 1]])  # a prompt of 2 tokens, a response of 3
    codes = t(1.0, 2.0, 3.0, 4.0, 5.0).view(1, 5, 1)  # one latent; its code at position t is t + 1
    pooled = fpo.pooled_features(codes, response_mask)
    # (2.0 + 3.0 + 4.0) / 3, the codes of positions 1, 2, 3; not (3.0 + 4.0 + 5.0) / 3 = 4.0, the
    # codes at the response tokens themselves
    assert pooled.tolist() == [[3.0]]
    docstring = fpo.pooled_features.__doc__
    assert "response_mask        = [[0,   0,   1,   1,   1  ]]" in docstring
    assert "codes[..., 0]        = [[1.0, 2.0, 3.0, 4.0, 5.0]]" in docstring
    assert "response_mask[:, 1:] = [[0,   1,   1,   1  ]]" in docstring
    assert "= [[(2.0 + 3.0 + 4.0) / 3]] = [[3.0]]" in docstring


def test_pooled_features_ignore_prompt_and_padding():
    codes = torch.arange(2 * 5 * 3, dtype=torch.float64).view(2, 5, 3)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    pooled = fpo.pooled_features(codes, mask)
    torch.testing.assert_close(pooled[0], (codes[0, 0] + codes[0, 1]) / 2)
    torch.testing.assert_close(pooled[1], codes[1, 3])
    changed = codes.clone()
    changed[0, [2, 3, 4]] += 100.0
    torch.testing.assert_close(fpo.pooled_features(changed, mask), pooled)


def test_pooled_features_and_feature_mse_compute_in_float32_for_bf16_inputs():
    gen = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(3, 7, 16, generator=gen)).bfloat16()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    pooled = fpo.pooled_features(codes, mask)
    assert pooled.dtype == torch.float32
    reference = fpo.pooled_features(codes.float(), mask)
    # the bf16 codes are exact in float32
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    drift = fpo.feature_mse(pooled.bfloat16(), torch.zeros(3, 16, dtype=torch.bfloat16), k=4)
    assert drift.dtype == torch.float32
    upcast_drift = fpo.feature_mse(pooled.bfloat16().float(), torch.zeros(3, 16), k=4)
    torch.testing.assert_close(drift, upcast_drift)


def test_pooled_topk_features_hand_computed():
    # row 0: tokens 2, 3 are the response, generated at positions 1, 2; row 1: token 1, at
    # position 0
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    # one sparse code (sae_k = 2) per generating position, in the order
    # hidden[:, :-1][mask[:, 1:].bool()]
    values = t(1.0, 2.0, 3.0, 0.0, 5.0, 6.0).view(3, 2).requires_grad_()
    indices = torch.tensor([[0, 3], [3, 1], [2, 0]])
    pooled = fpo.pooled_topk_features(values, indices, mask, d_sae=4)
    expected = t(0.5, 0.0, 0.0, 2.5, 6.0, 0.0, 5.0, 0.0).view(2, 4)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    pooled[0, 3].backward()  # latent 3 of row 0 fired at both of its positions
    expected_grad = t(0.0, 0.5, 0.5, 0.0, 0.0, 0.0).view(3, 2)
    torch.testing.assert_close(values.grad, expected_grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- log-probs, KL


def test_sequence_logps_hand_computed_and_shifted():
    # vocab 2; position t's logits predict token t+1
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, 5.0]]])  # (1, 3, 2)
    input_ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])  # tokens 1 and 2 are the response
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)
    # token 1 = id 1 under softmax([0, log 3]) = 3/4; token 2 = id 0 under softmax([log 4, 0]) = 4/5
    assert math.isclose(sum_logps.item(), math.log(0.75) + math.log(0.8), rel_tol=1e-6)
    assert n_tokens.item() == 2


def test_sequence_logps_ignore_prompt_and_padding():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=gen)
    input_ids = torch.randint(0, 5, (2, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    before = fpo.sequence_logps(logits, input_ids, mask)
    changed_ids = input_ids.clone()
    changed_logits = logits.clone()
    # prompt and padding tokens
    changed_ids[0, [0, 1, 4, 5]] = (changed_ids[0, [0, 1, 4, 5]] + 1) % 5
    changed_logits[0, [3, 4, 5]] += torch.randn(3, 5, generator=gen)  # logits that predict padding
    after = fpo.sequence_logps(changed_logits, changed_ids, mask)
    torch.testing.assert_close(after, before)


def test_sequence_kl_zero_for_identical_and_hand_computed_in_both_directions():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5)
    same = fpo.sequence_kl(p_logits=logits, q_logits=logits, response_mask=mask)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    policy = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])  # position 0: (1/2, 1/2)
    reference = torch.tensor([[[math.log(3.0), 0.0], [1.0, 0.0]]])  # position 0: (3/4, 1/4)
    mask = torch.tensor([[0, 1]])
    # TDPO's SeqKL: KL(reference || policy), p = reference
    seq_kl = fpo.sequence_kl(p_logits=reference, q_logits=policy, response_mask=mask)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert math.isclose(seq_kl.item(), expected, rel_tol=1e-5)
    # evaluation's KL(policy || reference), p = policy: a different number (KL is not symmetric)
    eval_kl = fpo.sequence_kl(p_logits=policy, q_logits=reference, response_mask=mask)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(eval_kl.item(), expected, rel_tol=1e-5)


def test_all_padding_response_is_finite_everywhere():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=gen, requires_grad=True)
    input_ids = torch.randint(0, 6, (2, 4), generator=gen)
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]])
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)
    avg = sum_logps / n_tokens
    pooled = fpo.pooled_features(torch.relu(torch.randn(2, 4, 9, generator=gen)), mask)
    mse = fpo.feature_mse(pooled, torch.zeros_like(pooled), k=3)
    kl = fpo.sequence_kl(p_logits=logits.detach() + 1.0, q_logits=logits, response_mask=mask)
    losses, _, _ = fpo.fpo_loss(
        avg[:1],
        avg[1:],
        avg[:1].detach(),
        avg[1:].detach(),
        mse[:1],
        mse[1:],
    )
    (losses.sum() + kl.sum()).backward()
    for value in (sum_logps, n_tokens, avg, pooled, mse, kl, losses, logits.grad):
        assert torch.isfinite(value).all()
    assert n_tokens[0] == 1 and sum_logps[0] == 0 and torch.all(pooled[0] == 0)


# ---------------------------------------------------------------------------------- cache


def test_reference_cache_round_trip_is_exact():
    gen = torch.Generator().manual_seed(0)
    d_model, d_sae, n_rows, T = 4, 10, 5, 6
    encoder = torch.randn(d_model, d_sae, generator=gen)
    hidden = torch.randn(n_rows, T, d_model, generator=gen)
    logits = torch.randn(n_rows, T, 7, generator=gen)
    input_ids = torch.randint(0, 7, (n_rows, T), generator=gen)
    mask = (torch.rand(n_rows, T, generator=gen) > 0.4).long()
    mask[:, 0] = 0
    mask[2] = 0  # an empty response

    def encode(h):
        return torch.relu(h @ encoder - 0.5)

    # rows arrive out of order, in two batches
    order = torch.tensor([3, 0, 4, 1, 2])
    batches = [
        (order[:2], input_ids[order[:2]], mask[order[:2]]),
        (order[2:], input_ids[order[2:]], mask[order[2:]]),
    ]

    def reference_fn(ids):
        rows = [int((input_ids == ids[i]).all(dim=-1).nonzero()[0]) for i in range(len(ids))]
        return logits[rows], hidden[rows]

    cache = fpo.build_reference_cache(reference_fn, encode, batches, n_rows=n_rows, d_sae=d_sae)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)
    assert torch.equal(cache["sum_logps"], sum_logps) and torch.equal(cache["n_tokens"], n_tokens)
    assert torch.equal(cache["avg_logps"], sum_logps / n_tokens)
    dense = fpo.reference_pooled_features(cache, torch.arange(n_rows))
    torch.testing.assert_close(dense, fpo.pooled_features(encode(hidden), mask))
    assert cache["feature_indices"].numel() < n_rows * d_sae  # stored sparsely


def small_cache():
    """A cache of 4 responses over 6 latents, with rows of 2, 0, 3 and 1 non-zero features."""
    pooled = torch.tensor([[0.0, 1.5, 0.0, 0.0, 2.0, 0.0], [0.0] * 6,
                           [0.25, 0.0, 0.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    lengths = torch.tensor([0, 2, 0, 3, 1])
    nonzero = pooled.nonzero()
    cache = {
        "feature_offsets": lengths.cumsum(dim=0),
        "feature_indices": nonzero[:, 1].to(torch.int32),
        "feature_values": pooled[pooled != 0],
        "d_sae": 6,
    }
    return pooled, cache


def test_reference_pooled_features_lives_on_row_ids_device_and_makes_nothing_on_default_device():
    pooled, cache = small_cache()
    row_ids = torch.tensor([3, 0, 1, 3, 2])
    # every tensor made inside must be placed explicitly (the cache's device): a bare torch.arange
    # or torch.zeros would land on the meta device here and fail to mix with the CPU tensors
    with torch.device("meta"):
        dense = fpo.reference_pooled_features(cache, row_ids)
    assert dense.device == row_ids.device and dense.dtype == torch.float32
    assert torch.equal(dense, pooled[row_ids])


def test_dpo_with_the_cached_sums_equals_dpo_with_an_online_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    n_rows, T, V = 6, 9, 11
    reference_logits = torch.randn(n_rows, T, V, generator=gen)
    input_ids = torch.randint(0, V, (n_rows, T), generator=gen)
    mask = torch.zeros(n_rows, T, dtype=torch.long)
    for row, (start, end) in enumerate([(3, 9), (4, 7), (2, 9), (5, 9), (3, 6), (6, 9)]):
        mask[row, start:end] = 1
    cache = fpo.build_reference_cache(
        lambda ids: (reference_logits, torch.zeros(n_rows, T, 2)),
        lambda h: torch.relu(h),
        [(torch.arange(n_rows), input_ids, mask)],
        n_rows=n_rows,
        d_sae=2,
    )
    policy_logps = -torch.rand(n_rows, generator=gen) * 20
    online_logps, _ = fpo.sequence_logps(reference_logits, input_ids, mask)
    online = fpo.dpo_loss(
        policy_logps[:3],
        policy_logps[3:],
        online_logps[:3],
        online_logps[3:],
        beta=0.1,
    )
    cached = fpo.dpo_loss(
        policy_logps[:3],
        policy_logps[3:],
        cache["sum_logps"][:3],
        cache["sum_logps"][3:],
        beta=0.1,
    )
    for a, b in zip(online, cached):
        assert torch.equal(a, b)


def test_fingerprint_changes_with_any_part():
    state = {"w": torch.ones(3), "b": torch.zeros(2)}
    base = runtime.fingerprint(state, torch.arange(5), {"beta": 0.1})
    reordered = {"b": torch.zeros(2), "w": torch.ones(3)}
    assert base == runtime.fingerprint(reordered, torch.arange(5), {"beta": 0.1})
    nudged = {"w": torch.ones(3) * 1.0001, "b": torch.zeros(2)}
    assert base != runtime.fingerprint(nudged, torch.arange(5), {"beta": 0.1})
    assert base != runtime.fingerprint(state, torch.arange(6), {"beta": 0.1})
    assert base != runtime.fingerprint(state, torch.arange(5), {"beta": 0.2})


@pytest.mark.slow
def test_fpo_py_runs_alone_in_an_empty_directory(tmp_path):
    shutil.copy(ROOT / "fpo.py", tmp_path / "fpo.py")
    script = (
        "import sys, torch, fpo\n"
        "x = torch.tensor([-1.0]); print(fpo.fpo_loss(x, x - 1, x, x, x * 0, x * 0)[0].item())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # defaults beta 0.1, alpha 0.5: chosen reward 0.1*(-1 - -1) = 0, rejected 0.1*(-2 - -1) = -0.1,
    # D = 0
    assert math.isclose(float(result.stdout), nll_of_logit(0.1), rel_tol=1e-6)


def test_fpo_py_imports_only_torch_and_the_standard_library():
    imported = set()
    for line in (ROOT / "fpo.py").read_text().splitlines():
        words = line.split()
        if words[:1] in (["import"], ["from"]) and not line.startswith(" "):
            imported.add(words[1].split(".")[0])
    assert imported <= {"torch", "hashlib", "json", "typing"}, imported
