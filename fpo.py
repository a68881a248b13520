"""FPO: preference optimisation with sparse feature-level constraints, as pure tensor functions.

Yin et al., "Direct Preference Optimization Using Sparse Feature-Level Constraints"
(arXiv 2411.07618). Every DPO-family loss here is  -log sigmoid(logit)  with

    FPO    logit = beta*[(avg_logp_theta(y_w) - avg_logp_ref(y_w)) - (avg_logp_theta(y_l) - avg_logp_ref(y_l))]
                   - alpha*(beta*D(y_l) - stopgrad(beta*D(y_w)))
    D(y)   = (1/k) * sum_{i in topk(pooled_theta) U topk(pooled_ref)} (pooled_theta_i - pooled_ref_i)^2
             (top-k over activated features only; pooled = mean SAE code at the positions generating y)
    DPO    logit = beta*(logp_theta(y_w) - logp_ref(y_w)) - beta*(logp_theta(y_l) - logp_ref(y_l))
    SimPO  logit = beta*avg_logp_theta(y_w) - beta*avg_logp_theta(y_l) - gamma
    TDPO   logit = DPO logit - beta*(SeqKL(y_l) - SeqKL(y_w))                         (TDPO-1)
           logit = DPO logit - alpha*(beta*SeqKL(y_l) - stopgrad(beta*SeqKL(y_w)))    (TDPO-2)

FPO's reference terms (avg_logp_ref and the pooled reference SAE codes) depend only on the frozen
reference, so `build_reference_cache` computes them once, offline; training then needs no
reference model, only `reference_pooled_features` to read a batch back from the cache.
`pooled_topk_features` pools a TopK SAE's sparse codes directly, for training at scale.

This file imports only torch and the standard library: copy it into any project.
"""

import hashlib
import json
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Per-sequence quantities


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the response tokens, and how many there are (avg_logp(y), paper Sec. 3).

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
    token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mask = response_mask[:, 1:].float()  # (B, T-1)
    return (token_logps * mask).sum(-1), mask.sum(-1).clamp(min=1.0)


def pooled_features(codes: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean SAE code over the positions that generate the response tokens: pooled(y) (paper Sec. 3).

    Shifted like `sequence_logps`: position t's code is pooled iff token t+1 is a response token, so
    codes[:, :-1] are masked by response_mask[:, 1:] (the authors' code pools pi_fm[:, :-1] by
    labels[:, 1:]); the last response token's own position generates nothing and is never pooled.
    Computes in float32 (float64 stays float64), so a bf16 model still gives float32 codes.

    Args:
        codes: SAE codes of each position's residual stream. Shape: (B, T, F).
        response_mask: the token-level mask `sequence_logps` takes: 1 at response tokens, 0 at prompt
            and padding. Shape: (B, T).

    Returns:
        pooled codes, on codes' device; all zeros for a response with no tokens. Shape: (B, F).
    """
    codes = codes[:, :-1].to(torch.promote_types(codes.dtype, torch.float32))  # (B, T-1, F)
    mask = response_mask[:, 1:].to(codes.dtype)  # (B, T-1)
    n_tokens = mask.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1), the |y| of sequence_logps
    return torch.einsum("btf,bt->bf", codes, mask) / n_tokens  # pooled(y) = (1/|y|) sum_t z_t (paper Sec. 3)


def pooled_topk_features(
    topk_values: torch.Tensor, topk_indices: torch.Tensor, response_mask: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """pooled(y) from a TopK SAE's sparse codes, without the dense (B, T, d_sae) code tensor.

    Equals `pooled_features(codes, response_mask)` where codes densifies (topk_values, topk_indices)
    at the generating positions, i.e. at hidden[:, :-1][response_mask[:, 1:].bool()], in that order
    (e.g. `SparseAutoencoder.encode_topk` of those rows). Differentiable w.r.t. topk_values.

    Args:
        topk_values: the non-zero candidates of each generating position's code. Shape: (N, sae_k).
        topk_indices: which latent each value belongs to. Shape: (N, sae_k).
        response_mask: the token-level mask `sequence_logps` takes. Shape: (B, T).
        d_sae: SAE width.

    Returns:
        pooled codes, on topk_values' device, float32 (float64 stays float64). Shape: (B, d_sae).
    """
    counts = response_mask[:, 1:].bool().sum(-1)  # (B,): generating positions per response
    row = torch.arange(len(counts), device=counts.device).repeat_interleave(counts)  # (N,)
    values = topk_values.to(torch.promote_types(topk_values.dtype, torch.float32))  # (N, sae_k)
    summed = values.new_zeros(len(counts), d_sae).index_put(
        (row[:, None].expand_as(topk_indices), topk_indices), values, accumulate=True
    )  # (B, d_sae); accumulate: a latent fires at several positions of one response
    return summed / counts.clamp(min=1)[:, None]  # pooled(y) = (1/|y|) sum_t z_t (paper Sec. 3)


def feature_mse(policy_pooled: torch.Tensor, reference_pooled: torch.Tensor, k: int) -> torch.Tensor:
    """D(y): squared differences over the union of both sides' top-k activated features, divided by k (paper Sec. 3).

    Top-k ranges over activated features only (value > 0): a latent at 0 is never "top", and a side
    with fewer than k active features contributes all of them and no more. So D(y) never depends on
    how latents are numbered. The union holds up to 2k features; dividing by k (not by its size)
    follows the paper. Computes in float32 (float64 stays float64).

    Args:
        policy_pooled: pooled policy codes. Shape: (B, F).
        reference_pooled: pooled reference codes. Shape: (B, F).
        k: FPO's top-k, how many activated features each side contributes at most.

    Returns:
        D(y) per response, on the inputs' device. Shape: (B,).
    """
    dtype = torch.promote_types(torch.promote_types(policy_pooled.dtype, reference_pooled.dtype), torch.float32)
    policy_pooled, reference_pooled = policy_pooled.to(dtype), reference_pooled.to(dtype)
    k = min(k, policy_pooled.shape[-1])
    union = top_activated(policy_pooled, k) | top_activated(reference_pooled, k)  # (B, F): I(y)
    squared_diff = (policy_pooled - reference_pooled).pow(2)  # (B, F)
    return (squared_diff * union).sum(-1) / k  # D(y) = (1/k) sum_{i in I(y)} (...)^2 (paper Sec. 3)


def top_activated(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """Which features are among the k largest AND above 0. pooled: Shape: (B, F). Returns bool, Shape: (B, F)."""
    values, indices = pooled.detach().topk(k, dim=-1)  # (B, k)
    return torch.zeros_like(pooled, dtype=torch.bool).scatter(-1, indices, values > 0)


def sequence_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """SeqKL(y) of TDPO (Zeng et al. 2024; FPO paper Sec. 2): sum over response tokens of KL(pi_ref(.|prefix) || pi_theta(.|prefix)).

    Shifted like `sequence_logps`: the distributions at positions [:, :-1] are the ones that
    generate the response tokens marked by response_mask[:, 1:]. Full vocabulary, log-space.

    Args:
        policy_logits: policy outputs. Shape: (B, T, V).
        reference_logits: reference outputs for the same inputs. Shape: (B, T, V).
        response_mask: 1 at response tokens, 0 at prompt and padding. Shape: (B, T).

    Returns:
        summed per-token KL, float32, on the logits' device. Shape: (B,).
    """
    policy_logps = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    reference_logps = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_kl = (reference_logps.exp() * (reference_logps - policy_logps)).sum(-1)  # (B, T-1)
    return (token_kl * response_mask[:, 1:].float()).sum(-1)


# ----------------------------------------------------------------------------------------------
# Losses. Each returns (losses, chosen_rewards, rejected_rewards), all of shape (B,) on the inputs'
# device, rewards detached.


def fpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    reference_chosen_avg_logps: torch.Tensor,
    reference_rejected_avg_logps: torch.Tensor,
    chosen_feature_mse: torch.Tensor,
    rejected_feature_mse: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FPO loss (paper Sec. 3, the final objective; README "The equations").

    Args:
        policy_chosen_avg_logps: avg_logp_theta(y_w). Shape: (B,).
        policy_rejected_avg_logps: avg_logp_theta(y_l). Shape: (B,).
        reference_chosen_avg_logps: avg_logp_ref(y_w), from the offline cache. Shape: (B,).
        reference_rejected_avg_logps: avg_logp_ref(y_l), from the offline cache. Shape: (B,).
        chosen_feature_mse: D(y_w); gets no gradient (stop-gradient). Shape: (B,).
        rejected_feature_mse: D(y_l). Shape: (B,).
        beta: scale of the log-prob differences and of D.
        alpha: weight of the feature constraint; alpha = 0 is length-normalised DPO with the offline margin.

    Returns:
        losses: -log sigmoid(LPD - margin - constraint), per pair. Shape: (B,).
        chosen_rewards: beta * (avg_logp_theta(y_w) - avg_logp_ref(y_w)), detached. Shape: (B,).
        rejected_rewards: beta * (avg_logp_theta(y_l) - avg_logp_ref(y_l)), detached. Shape: (B,).
        All on the inputs' device.
    """
    chosen_rewards = beta * (policy_chosen_avg_logps - reference_chosen_avg_logps)  # LPD - margin, chosen half
    rejected_rewards = beta * (policy_rejected_avg_logps - reference_rejected_avg_logps)
    constraint = alpha * (beta * rejected_feature_mse - (beta * chosen_feature_mse).detach())  # TDPO-2 form
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - constraint)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


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
        kl_term = alpha * (beta * rejected_seq_kl - (beta * chosen_seq_kl).detach())  # TDPO_2: no gradient through the chosen side
    else:
        raise ValueError(f"TDPO version must be 1 or 2, got {version}")
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - kl_term)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ----------------------------------------------------------------------------------------------
# The offline reference cache: one pass of the frozen reference, before training (paper Sec. 3, offline reference).


def fingerprint(*parts) -> str:
    """A short sha256 of tensors, dicts of tensors (state dicts), lists, strings and JSON-able values.

    Used to tie a reference cache to the exact reference weights, SAE weights, data and config.
    """
    digest = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest.update(str(key).encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            digest.update(f"[{len(obj)}".encode())
            for item in obj:
                feed(item)
        else:
            digest.update(json.dumps(obj, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()[:16]


@torch.no_grad()
def build_reference_cache(
    reference_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sae_encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_rows: int,
    d_sae: int,
) -> dict:
    """One reference pass: each response's summed and average log-prob and its pooled SAE codes, stored sparsely.

    The pooled reference codes are non-negative and non-zero only on features some generating
    position activated, so the (index, value) list of all non-zeros reproduces them exactly. The
    summed log-probs are kept as computed, so DPO with this cache equals DPO with an online
    reference bit for bit.

    Args:
        reference_fn: token ids (R, T) -> (logits (R, T, V), residual stream (R, T, d_model)) of the
            frozen reference at the SAE's layer. Any model fits behind a lambda.
        sae_encode: residual stream (..., d_model) -> codes (..., d_sae).
        batches: yields (row_ids (R,), input_ids (R, T), response_mask (R, T)); row_ids say which
            cache row each sequence fills, each of 0..n_rows-1 exactly once.
        n_rows: number of responses in the cache.
        d_sae: SAE width, stored so readers can densify.

    Returns:
        dict of tensors on the CPU: sum_logps (n_rows,), n_tokens (n_rows,) and avg_logps =
        sum_logps / n_tokens (n_rows,), float32; the pooled codes in compressed-row form:
        feature_offsets (n_rows + 1,), feature_indices (nnz,), feature_values (nnz,); and d_sae.
    """
    sum_logps = torch.full((n_rows,), float("nan"))
    n_tokens = torch.zeros(n_rows)
    row_indices, row_values = [None] * n_rows, [None] * n_rows
    for row_ids, input_ids, response_mask in batches:
        logits, hidden = reference_fn(input_ids)
        sums, counts = sequence_logps(logits, input_ids, response_mask)
        pooled = pooled_features(sae_encode(hidden), response_mask).cpu()  # (R, d_sae)
        rows = row_ids.cpu()
        sum_logps[rows], n_tokens[rows] = sums.cpu(), counts.cpu()
        for row, vector in zip(rows.tolist(), pooled):
            nonzero = vector.nonzero().squeeze(-1)
            row_indices[row], row_values[row] = nonzero, vector[nonzero]
    if any(indices is None for indices in row_indices):
        raise ValueError("build_reference_cache: some rows in 0..n_rows-1 were never filled")
    lengths = torch.tensor([0] + [len(indices) for indices in row_indices])
    return {
        "sum_logps": sum_logps,
        "n_tokens": n_tokens,
        "avg_logps": sum_logps / n_tokens,
        "feature_offsets": lengths.cumsum(0),
        "feature_indices": torch.cat(row_indices).to(torch.int32),
        "feature_values": torch.cat(row_values).float(),
        "d_sae": d_sae,
    }


def reference_pooled_features(cache: dict, row_ids: torch.Tensor) -> torch.Tensor:
    """Densify the cached pooled reference codes of some rows (exact: missing features are 0).

    Works wherever the cache and row_ids live: the indexing runs on the cache's device, and the
    result moves to row_ids' device (the caller's).

    Args:
        cache: a dict from `build_reference_cache`.
        row_ids: which rows. Shape: (R,).

    Returns:
        pooled_ref(y) per row, float32, on row_ids' device. Shape: (R, d_sae).
    """
    offsets = cache["feature_offsets"]
    rows = row_ids.to(offsets.device)  # (R,)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]  # (R,), (R,)
    # One scatter for the whole batch: entry j of row r sits at offsets[rows[r]] + j.
    row = torch.repeat_interleave(torch.arange(len(rows), device=offsets.device), lengths)  # (nnz,)
    first_entry = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (nnz,)
    within = torch.arange(int(lengths.sum()), device=offsets.device) - first_entry  # (nnz,)
    entry = starts[row] + within  # (nnz,)
    dense = torch.zeros(len(rows), cache["d_sae"], device=offsets.device)
    dense[row, cache["feature_indices"][entry].long()] = cache["feature_values"][entry]
    return dense.to(row_ids.device)
