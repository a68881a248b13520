"""FPO: preference optimisation with sparse feature-level constraints, as pure tensor functions.

The paper: Yin et al., "Constrain Alignment with Sparse Autoencoders", ICML 2025, arXiv 2411.07618
(v4; earlier versions are titled "Direct Preference Optimization Using Sparse Feature-Level
Constraints"). Every DPO-family loss here is  -log sigmoid(logit); FPO's is

    logit = beta*[(avg_logp_theta(y_w) - avg_logp_ref(y_w))
                  - (avg_logp_theta(y_l) - avg_logp_ref(y_l))]
            - alpha*(beta*D(y_l) - stopgrad(beta*D(y_w)))
    D(y)  = (1/k) * sum_{i in I(y)} (pooled_theta_i - pooled_ref_i)^2,   the feature MSE,
            I(y) = topk(pooled_theta) U topk(pooled_ref) over activated features only,
            pooled = the mean SAE code at the positions generating y

The file reads in the order a training step needs it: 1. log-probs, 2. pooling, 3. D(y), 4. the
loss, 5. the offline cache (the reference's terms, computed once, so training needs no reference
model) and `cached_feature_mse`, a batch's D(y) from its hidden states and the cache. Then the
baselines: DPO, SimPO and TDPO, whose TDPO-2 is FPO's nearest relative (the same constraint form,
with the sequential KL where FPO has D(y)).

This file imports only torch and the standard library: copy it into any project.
"""

from typing import Callable, Iterable

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Log-probs of the response tokens


def sequence_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens and their count: avg_logp(y) (paper Sec. 3).

    Logits at position t predict the token at t+1, so logits[:, :-1] are scored against
    input_ids[:, 1:] and masked by response_mask[:, 1:]. Prompt and padding positions (mask 0)
    never count. The average log-prob is sum_logps / n_tokens.

    Args:
        logits: model outputs. Shape: (B, T, V).
        input_ids: token ids. Shape: (B, T).
        response_mask: 1 at response tokens, 0 at prompt and padding. Shape: (B, T).

    Returns (float32, on logits' device):
        sum_logps: sum of log pi(y_t | x, y_<t) over response tokens. Shape: (B,).
        n_tokens: number of response tokens, clamped to at least 1. Shape: (B,).
    """
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_logps = logps.gather(dim=-1, index=input_ids[:, 1:, None]).squeeze(dim=-1)  # (B, T-1)
    mask = response_mask[:, 1:].float()  # (B, T-1)
    return (token_logps * mask).sum(dim=-1), mask.sum(dim=-1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# 2. Pooling: one SAE code vector per response


def pooled_features(codes: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """pooled(y): the mean SAE code over the positions that generate the response (paper Sec. 3).

    Shifted like `sequence_logps`: position t's code is pooled iff token t+1 is a response token,
    so codes[:, :-1] are masked by response_mask[:, 1:] (the authors' code pools pi_fm[:, :-1] by
    labels[:, 1:]); the last response token's own position generates nothing and is never pooled.
    Computes in float32 (float64 stays float64), so a bf16 model still gives float32 codes.

    Example: one row of five tokens, a prompt of 2 and a response of 3, one latent (F = 1):
        response_mask        = [[0,   0,   1,   1,   1  ]]   tokens 2, 3, 4 are the response
        codes[..., 0]        = [[1.0, 2.0, 3.0, 4.0, 5.0]]
        codes[:, :-1, 0]     = [[1.0, 2.0, 3.0, 4.0]]
        response_mask[:, 1:] = [[0,   1,   1,   1  ]]        positions 1, 2, 3 generate 2, 3, 4
        pooled_features(codes, response_mask) = [[(2.0 + 3.0 + 4.0) / 3]] = [[3.0]]
    and not the codes AT the response tokens, (3.0 + 4.0 + 5.0) / 3 = 4.0.

    Args:
        codes: SAE codes of each position's residual stream. Shape: (B, T, F).
        response_mask: the token-level mask `sequence_logps` takes: 1 at response tokens, 0 at
            prompt and padding. Shape: (B, T).

    Returns:
        pooled codes, on codes' device; all zeros for a response with no tokens. Shape: (B, F).
    """
    codes = codes[:, :-1].to(torch.promote_types(codes.dtype, torch.float32))  # (B, T-1, F)
    mask = response_mask[:, 1:].to(codes.dtype)  # (B, T-1)
    n_tokens = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, 1), the |y| of sequence_logps
    # pooled(y) = (1/|y|) sum_t z_t (paper Sec. 3)
    return torch.einsum("btf,bt->bf", codes, mask) / n_tokens


def pooled_topk_features(
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    response_mask: torch.Tensor,
    d_sae: int,
) -> torch.Tensor:
    """pooled(y) from a TopK SAE's sparse codes, without the dense (B, T, d_sae) code tensor.

    Equals `pooled_features` of the densified codes when (topk_values, topk_indices), each
    (N, sae_k), are the codes of the generating positions hidden[:, :-1][response_mask[:, 1:]
    .bool()], in that order (e.g. `SparseAutoencoder.encode_topk` of those rows); differentiable
    w.r.t. topk_values. response_mask (B, T); d_sae: the SAE's width. Returns the pooled codes,
    float32 (float64 stays float64). Shape: (B, d_sae).
    """
    counts = response_mask[:, 1:].bool().sum(dim=-1)  # (B,): generating positions per response
    row = torch.arange(len(counts), device=counts.device).repeat_interleave(counts)  # (N,)
    values = topk_values.to(torch.promote_types(topk_values.dtype, torch.float32))  # (N, sae_k)
    summed = values.new_zeros(len(counts), d_sae).index_put(
        (row[:, None].expand_as(topk_indices), topk_indices),
        values,
        accumulate=True,
    )  # (B, d_sae); accumulate: a latent fires at several positions of one response
    return summed / counts.clamp(min=1)[:, None]  # pooled(y) = (1/|y|) sum_t z_t (paper Sec. 3)


# ----------------------------------------------------------------------------------------------
# 3. D(y), the feature MSE


def feature_mse(
    policy_pooled: torch.Tensor,
    reference_pooled: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """D(y): squared differences over the union I(y) of both sides' top-k features (paper Sec. 3).

    I(y) = topk(policy_pooled) U topk(reference_pooled), and the sum over I(y) is divided by k.
    Top-k ranges over activated features only (value > 0): a latent at 0 is never "top", and a
    side with fewer than k active features contributes all of them and no more. So D(y) never
    depends on how latents are numbered. The union holds up to 2k features; dividing by k (not by
    its size) follows the paper. Computes in float32 (float64 stays float64).

    Example, four latents (feature 3 is 0 on both sides and never in I(y)):
        policy_pooled    = [[0.5, 0.0, 0.2, 0.0]]
        reference_pooled = [[0.0, 0.4, 0.1, 0.0]]
        k = 1: I(y) = {0} U {1} = {0, 1}
               D = ((0.5 - 0.0)^2 + (0.0 - 0.4)^2) / 1 = (0.25 + 0.16) / 1 = 0.41
               (feature 2 differs by 0.1 but is in neither top-1: not counted)
        k = 2: I(y) = {0, 2} U {1, 2} = {0, 1, 2}
               D = (0.25 + 0.16 + 0.01) / 2 = 0.21   (divided by k = 2, not by |I(y)| = 3)

    Args:
        policy_pooled: pooled policy codes. Shape: (B, F).
        reference_pooled: pooled reference codes. Shape: (B, F).
        k: FPO's top-k, how many activated features each side contributes at most.
        weights: w_i per feature, like the paper's per-feature beta (Sec. 5.3); None: all 1. (F,).

    Returns:
        D(y) per response, on the inputs' device. Shape: (B,).
    """
    dtype = torch.promote_types(
        torch.promote_types(policy_pooled.dtype, reference_pooled.dtype),
        torch.float32,
    )
    policy_pooled = policy_pooled.to(dtype)
    reference_pooled = reference_pooled.to(dtype)
    k = min(k, policy_pooled.shape[-1])
    union = top_activated(policy_pooled, k) | top_activated(reference_pooled, k)  # (B, F): I(y)
    squared_diff = (policy_pooled - reference_pooled).pow(2)  # (B, F)
    w = 1.0 if weights is None else weights.to(squared_diff)  # (F,); x * 1.0 is x, bit for bit
    # D(y) = (1/k) sum_{i in I(y)} w_i (...)^2 (Sec. 3 has w_i = 1); I(y) is chosen unweighted
    return (squared_diff * union * w).sum(dim=-1) / k


def top_activated(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """Which features are among the k largest AND above 0: pooled (B, F) -> bool mask (B, F)."""
    values, indices = pooled.detach().topk(k, dim=-1)  # (B, k)
    return torch.zeros_like(pooled, dtype=torch.bool).scatter(dim=-1, index=indices, src=values > 0)


# ----------------------------------------------------------------------------------------------
# 4. The FPO loss. Every loss returns (losses, chosen_rewards, rejected_rewards), each (B,)
# on the inputs' device, rewards detached.


def fpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    reference_chosen_avg_logps: torch.Tensor,
    reference_rejected_avg_logps: torch.Tensor,
    chosen_feature_mse: torch.Tensor,
    rejected_feature_mse: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    stop_gradient: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FPO loss (paper Sec. 3, the final objective; README "The equations").

    The defaults beta=0.1, alpha=0.5 are the paper's at Gemma scale; this project's pipeline
    defaults (config.py) are beta 1.0 and alpha 256.0, the sweep's pick for the toy GPT.

    Args:
        policy_chosen_avg_logps: avg_logp_theta(y_w). Shape: (B,).
        policy_rejected_avg_logps: avg_logp_theta(y_l). Shape: (B,).
        reference_chosen_avg_logps: avg_logp_ref(y_w), from the offline cache. Shape: (B,).
        reference_rejected_avg_logps: avg_logp_ref(y_l), from the offline cache. Shape: (B,).
        chosen_feature_mse: D(y_w); no gradient flows through it when stop_gradient. Shape: (B,).
        rejected_feature_mse: D(y_l). Shape: (B,).
        beta: scale of the log-prob differences and of D.
        alpha: weight of the feature constraint; alpha = 0 is length-normalised DPO with the
            offline margin.
        stop_gradient: the paper's stop-gradient on D(y_w), so training pulls only the rejected
            response's features back to the reference; False lets the gradient flow through
            D(y_w) too (the paper's ablation). The loss value is the same either way.

    Returns:
        losses: -log sigmoid(LPD - margin - constraint), per pair. Shape: (B,).
        chosen_rewards: beta * (avg_logp_theta(y_w) - avg_logp_ref(y_w)), detached. Shape: (B,).
        rejected_rewards: beta * (avg_logp_theta(y_l) - avg_logp_ref(y_l)), detached. Shape: (B,).
        All on the inputs' device.
    """
    # LPD - margin, chosen half
    chosen_rewards = beta * (policy_chosen_avg_logps - reference_chosen_avg_logps)
    rejected_rewards = beta * (policy_rejected_avg_logps - reference_rejected_avg_logps)
    # TDPO-2 form: alpha * (beta * D(y_l) - stopgrad(beta * D(y_w)))
    chosen_constraint = beta * chosen_feature_mse
    if stop_gradient:
        chosen_constraint = chosen_constraint.detach()
    constraint = alpha * (beta * rejected_feature_mse - chosen_constraint)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - constraint)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ----------------------------------------------------------------------------------------------
# 5. The offline reference cache: one pass of the frozen reference, before training
# (paper Sec. 3, offline reference), and D(y) from it in every training step.


@torch.no_grad()
def build_reference_cache(
    reference_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sae_encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_rows: int,
    d_sae: int,
) -> dict:
    """One reference pass: each response's log-probs and pooled SAE codes, stored sparsely.

    For each response: its summed and average log-prob, and its pooled SAE codes.
    The pooled reference codes are non-negative and non-zero only on features some generating
    position activated, so the (index, value) list of all non-zeros reproduces them exactly. The
    summed log-probs are kept as computed, so DPO with this cache equals DPO with an online
    reference bit for bit.

    Args:
        reference_fn: token ids (R, T) -> (logits (R, T, V), residual stream (R, T, d_model)) of the
            frozen reference at the SAE's layer, in eval mode. Any model fits behind a lambda.
        sae_encode: residual stream (..., d_model) -> codes (..., d_sae), of the frozen SAE.
        batches: yields (row_ids (R,), input_ids (R, T), response_mask (R, T)); row_ids say which
            cache row each sequence fills, each of 0..n_rows-1 exactly once.
        n_rows: every response of the dataset (two per pair), not one batch's.
        d_sae: SAE width, stored so readers can densify.

    Returns:
        dict of tensors on the CPU: sum_logps (n_rows,), n_tokens (n_rows,) and avg_logps =
        sum_logps / n_tokens (n_rows,), float32; the pooled codes in compressed-row form:
        feature_offsets (n_rows + 1,), feature_indices (nnz,), feature_values (nnz,); and d_sae.
    """
    sum_logps = torch.full((n_rows,), float("nan"))
    n_tokens = torch.zeros(n_rows)
    row_indices = [None] * n_rows
    row_values = [None] * n_rows
    for row_ids, input_ids, response_mask in batches:
        logits, hidden = reference_fn(input_ids)
        sums, counts = sequence_logps(logits, input_ids, response_mask)
        pooled = pooled_features(sae_encode(hidden), response_mask).cpu()  # (R, d_sae)
        rows = row_ids.cpu()
        sum_logps[rows] = sums.cpu()
        n_tokens[rows] = counts.cpu()
        for row, vector in zip(rows.tolist(), pooled):
            nonzero = vector.nonzero().squeeze(dim=-1)
            row_indices[row] = nonzero
            row_values[row] = vector[nonzero]
    if any(indices is None for indices in row_indices):
        raise ValueError("build_reference_cache: some rows in 0..n_rows-1 were never filled")
    lengths = torch.tensor([0] + [len(indices) for indices in row_indices])
    return {
        "sum_logps": sum_logps,
        "n_tokens": n_tokens,
        "avg_logps": sum_logps / n_tokens,
        "feature_offsets": lengths.cumsum(dim=0),
        "feature_indices": torch.cat(row_indices).to(torch.int32),
        "feature_values": torch.cat(row_values).float(),
        "d_sae": d_sae,
    }


def reference_pooled_features(cache: dict, row_ids: torch.Tensor) -> torch.Tensor:
    """pooled_ref(y) of some cache rows, densified (exact: a missing feature is 0).

    row_ids (R,) -> float32 (R, d_sae) on row_ids' device; the indexing runs wherever the cache
    lives (the CPU in train.py).
    """
    offsets = cache["feature_offsets"]
    rows = row_ids.to(offsets.device)  # (R,)
    starts = offsets[rows]  # (R,)
    lengths = offsets[rows + 1] - offsets[rows]  # (R,)
    # One scatter for the whole batch: entry j of row r sits at offsets[rows[r]] + j.
    row = torch.repeat_interleave(torch.arange(len(rows), device=offsets.device), lengths)  # (nnz,)
    first_entry = torch.repeat_interleave(lengths.cumsum(dim=0) - lengths, lengths)  # (nnz,)
    within = torch.arange(int(lengths.sum()), device=offsets.device) - first_entry  # (nnz,)
    entry = starts[row] + within  # (nnz,)
    dense = torch.zeros(len(rows), cache["d_sae"], device=offsets.device)
    dense[row, cache["feature_indices"][entry].long()] = cache["feature_values"][entry]
    return dense.to(row_ids.device)


def cached_feature_mse(
    hidden: torch.Tensor,
    response_mask: torch.Tensor,
    sparse_encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    cache: dict,
    row_ids: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """D(y) of each response of a training batch: the policy's hidden states against the cache.

    The one function every trainer calls (train.py, integrations/trl). It encodes only the
    positions that generate response tokens (no other is pooled), pools their sparse codes, reads
    pooled_ref(y) from the cache and takes `feature_mse`. The SAE runs in float32 with autocast
    off, so its top-k choices do not depend on the policy's precision.

    Args:
        hidden: the policy's residual stream at the SAE's block. Shape: (R, T, d_model).
        response_mask: 1 at response tokens, 0 at prompt and padding. Shape: (R, T).
        sparse_encode: rows (N, d_model) -> (values (N, m), indices (N, m)), each row's non-zero
            candidates: a TopK SAE's `encode_topk`, or a dense SAE's codes with their indices.
        cache, row_ids: a `build_reference_cache` dict, each response's row in it (R,).
        k, weights: FPO's top-k features per side, and `feature_mse`'s w_i (None: all 1).

    Returns:
        D(y) per response, float32, on hidden's device. Shape: (R,).
    """
    generating = response_mask[:, 1:].bool()  # position t generates token t+1 (sequence_logps)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        values, indices = sparse_encode(hidden[:, :-1][generating].float())  # (N, m) each
    policy_pooled = pooled_topk_features(values, indices, response_mask, cache["d_sae"])  # (R, F)
    reference_pooled = reference_pooled_features(cache, row_ids).to(hidden.device)  # (R, F)
    return feature_mse(policy_pooled, reference_pooled, k, weights)


# ----------------------------------------------------------------------------------------------
# Baselines: the losses FPO is compared with, and TDPO's sequential KL.
#   DPO    logit = beta*(logp_theta(y_w) - logp_ref(y_w)) - beta*(logp_theta(y_l) - logp_ref(y_l))
#   SimPO  logit = beta*avg_logp_theta(y_w) - beta*avg_logp_theta(y_l) - gamma
#   TDPO-1 logit = DPO logit - beta*(SeqKL(y_l) - SeqKL(y_w))
#   TDPO-2 logit = DPO logit - alpha*(beta*SeqKL(y_l) - stopgrad(beta*SeqKL(y_w)))
#   SeqKL(y) = sum over response tokens of KL(pi_ref || pi_theta)


def sequence_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum over response tokens of KL(p || q), per sequence, over the full vocabulary.

    Which model is p and which is q depends on the use:
    - TDPO's SeqKL(y) (Zeng et al. 2024; FPO paper Sec. 2) is
      sum_t KL(pi_ref(.|prefix) || pi_theta(.|prefix)): p = reference, q = policy.
    - Evaluation's KL(policy || reference): p = policy, q = reference.
    Pass them by keyword (p_logits=..., q_logits=...) so the direction reads at the call.

    Shifted like `sequence_logps` (positions [:, :-1] generate the tokens response_mask[:, 1:]
    marks); log-space on both sides. p_logits, q_logits (B, T, V), the same inputs; response_mask
    (B, T). Returns the summed per-token KL(p || q), float32. Shape: (B,).
    """
    p_logps = torch.log_softmax(p_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    q_logps = torch.log_softmax(q_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_kl = (p_logps.exp() * (p_logps - q_logps)).sum(dim=-1)  # (B, T-1): KL(p || q) per token
    return (token_kl * response_mask[:, 1:].float()).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Eq. 7 of the DPO paper), on summed log-probs.

    Args:
        policy_chosen_logps: logp_theta(y_w), summed over response tokens. Shape: (B,).
        policy_rejected_logps: logp_theta(y_l). Shape: (B,).
        reference_chosen_logps: logp_ref(y_w). Shape: (B,).
        reference_rejected_logps: logp_ref(y_l). Shape: (B,).
        beta: inverse temperature of the implicit reward.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Eq. 6 of the SimPO paper): length-normalised, reference-free, target margin gamma.

    Args:
        policy_chosen_avg_logps: avg_logp_theta(y_w). Shape: (B,).
        policy_rejected_avg_logps: avg_logp_theta(y_l). Shape: (B,).
        beta: reward scale.
        gamma: target reward margin, subtracted as is (not multiplied by beta).
    """
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def tdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_seq_kl: torch.Tensor,
    rejected_seq_kl: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    version: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO (Zeng et al. 2024, TDPO_1 and TDPO_2 objectives): DPO minus a sequential-KL difference.

    Args:
        policy_chosen_logps: logp_theta(y_w), summed. Shape: (B,).
        policy_rejected_logps: logp_theta(y_l). Shape: (B,).
        reference_chosen_logps: logp_ref(y_w). Shape: (B,).
        reference_rejected_logps: logp_ref(y_l). Shape: (B,).
        chosen_seq_kl: SeqKL(y_w); in TDPO-2 it gets no gradient. Shape: (B,).
        rejected_seq_kl: SeqKL(y_l). Shape: (B,).
        beta: inverse temperature.
        alpha: weight of the KL term (TDPO-2 only).
        version: 1 or 2.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    if version == 1:
        kl_term = beta * (rejected_seq_kl - chosen_seq_kl)  # TDPO_1
    elif version == 2:
        # TDPO_2: no gradient through the chosen side
        kl_term = alpha * (beta * rejected_seq_kl - (beta * chosen_seq_kl).detach())
    else:
        raise ValueError(f"TDPO version must be 1 or 2, got {version}")
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - kl_term)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
