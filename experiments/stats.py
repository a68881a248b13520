"""The statistics and measurements the experiments add to evaluate.py's metrics: bootstrap
intervals over references and prompts, rank correlation, the terms of the paper's bound, and the
SAE latents of the judge's attributes.
"""

import torch

import data
import fpo
from model import GPT

# ----------------------------------------------------------------------------------------------
# Intervals and correlations over references


def bootstrap_mean(
    values: list[list[float]], n_resamples: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-prompt values, and its 95% bootstrap interval from resampling references, then
    prompts within each drawn reference, so both sources of variance are in it. values:
    (references, prompts); a reference's prompts may differ from another's (they are drawn
    with its seed), so prompts are never matched across references."""
    values = torch.tensor(values, dtype=torch.float64)
    n_references, n_prompts = values.shape  # values: (R, P)
    generator = torch.Generator().manual_seed(seed)
    references = torch.randint(0, n_references, (n_resamples, n_references, 1), generator=generator)
    prompts = torch.randint(
        0, n_prompts, (n_resamples, n_references, n_prompts), generator=generator
    )
    means = values[references, prompts].mean(dim=(1, 2))  # (n_resamples,)
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    low, high = torch.quantile(means, quantiles).tolist()
    return values.mean().item(), low, high


def paired_difference(a: list[list[float]], b: list[list[float]]) -> tuple[float, float, float]:
    """bootstrap_mean of a - b: two methods on the same references and prompts, (R, P) each."""
    differences = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return bootstrap_mean(differences.tolist())


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two (N,) tensors; tied values are ranked in their order
    (meant for continuous data, where ties are rare)."""
    ranks = [torch.empty(len(v), dtype=torch.float64) for v in (x, y)]
    for rank, values in zip(ranks, (x, y)):
        rank[values.argsort(stable=True)] = torch.arange(len(values), dtype=torch.float64)
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def bootstrap_spearman(
    x: list[torch.Tensor], y: list[torch.Tensor], n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Spearman's rank correlation of x and y pooled over references (one (N_r,) tensor each),
    and its 95% interval from resampling references, then items within each."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_resamples):
        picked = torch.randint(0, len(x), (len(x),), generator=generator).tolist()
        items = [torch.randint(0, len(x[r]), (len(x[r]),), generator=generator) for r in picked]
        draws.append(spearman(
            torch.cat([x[r][i] for r, i in zip(picked, items)]),
            torch.cat([y[r][i] for r, i in zip(picked, items)]),
        ))
    low, high = torch.quantile(torch.tensor(draws), torch.tensor([0.025, 0.975])).tolist()
    return spearman(torch.cat(x), torch.cat(y)), low, high


# ----------------------------------------------------------------------------------------------
# The paper's bound (its Appendix B): per-token KL against the change of the SAE codes


@torch.no_grad()
def bound_terms(
    policy: GPT, reference: GPT, sae, layer: int, input_ids: torch.Tensor, mask: torch.Tensor,
    fpo_k: int,
) -> dict[str, torch.Tensor]:
    """What the bound relates, on given responses. Per position that generates a response token
    (N of them): `kl`, KL(pi_ref || pi_theta) over the whole vocabulary; `logit_gap`, the squared
    distance of the two logit vectors; `code_gap`, ||c_theta - c_ref||^2 of the SAE codes of the
    two residual streams; `sigma`, the smaller of the two streams' layer-norm scales. Per
    response (B of them): `feature_mse`, D(y) over top-fpo_k pooled codes, and `sequence_kl`,
    SeqKL(y). input_ids, mask: (B, T)."""
    reference_logits, reference_hidden = reference(input_ids, hidden_layer=layer)
    logits, hidden = policy(input_ids, hidden_layer=layer)
    generating = mask[:, 1:].bool()  # position t generates response token t+1
    reference_logps = torch.log_softmax(reference_logits[:, :-1][generating].float(), dim=-1)
    logps = torch.log_softmax(logits[:, :-1][generating].float(), dim=-1)  # (N, V)
    reference_codes = sae.encode(reference_hidden.float())  # (B, T, d_sae)
    codes = sae.encode(hidden.float())
    eps = reference.ln_f.eps
    stream = hidden[:, :-1][generating].float()  # (N, d_model)
    reference_stream = reference_hidden[:, :-1][generating].float()
    sigma = torch.minimum(
        (stream.var(-1, unbiased=False) + eps).sqrt(),
        (reference_stream.var(-1, unbiased=False) + eps).sqrt(),
    )
    pooled = fpo.pooled_features(codes, mask)  # (B, d_sae)
    reference_pooled = fpo.pooled_features(reference_codes, mask)
    return {
        "kl": (reference_logps.exp() * (reference_logps - logps)).sum(-1),
        "logit_gap": (logits - reference_logits)[:, :-1][generating].float().pow(2).sum(-1),
        "code_gap": (codes - reference_codes)[:, :-1][generating].pow(2).sum(-1),
        "sigma": sigma,
        "feature_mse": fpo.feature_mse(pooled, reference_pooled, fpo_k),
        "sequence_kl": fpo.sequence_kl(
            p_logits=reference_logits, q_logits=logits, response_mask=mask
        ),
    }


def bound_constant(reference: GPT, sae, sigma: float) -> float:
    """M in KL_t <= M ||c_theta - c_ref||^2, through the final layer norm and the unembedding:
    KL between two softmaxes is at most a quarter of their logits' squared distance (the
    log-partition's Hessian, a covariance of one-hot vectors, has eigenvalues at most 1/2); the
    logits move at most ||W_U|| times the normed stream; the layer norm moves at most
    max|gamma| / sigma times the stream (sigma: its scale, here the smallest seen); and the
    stream moves ||W_dec|| / s times the codes, if the SAE reconstructs both streams exactly
    (s: the SAE's input scale). Assumes the policy's norm and unembedding are the reference's."""
    w_u = torch.linalg.matrix_norm(reference.lm_head.weight.float(), ord=2)
    w_dec = torch.linalg.matrix_norm(sae.W_dec.float(), ord=2) / sae.input_scale
    gamma = reference.ln_f.weight.float().abs().max()
    return (w_u * gamma / sigma * w_dec).pow(2).item() / 4


# ----------------------------------------------------------------------------------------------
# The latents of an attribute, and each latent's part of D(y) (--control)


@torch.no_grad()
def feature_mse_terms(
    policy: GPT, reference: GPT, sae, layer: int, batches, k: int
) -> torch.Tensor:
    """Each latent's part of D(y), averaged over the responses of `batches` ((input_ids (B, T),
    response_mask (B, T)) pairs): (pooled_theta_i - pooled_ref_i)^2 / k where latent i is in
    I(y), else 0, as fpo.feature_mse counts it with every w_i = 1. Shape: (d_sae,); its sum is
    the mean D(y)."""
    total, n_responses = 0.0, 0
    for input_ids, mask in batches:
        _, hidden = policy(input_ids, hidden_layer=layer)
        _, reference_hidden = reference(input_ids, hidden_layer=layer)
        pooled = fpo.pooled_features(sae.encode(hidden.float()), mask)  # (B, d_sae)
        reference_pooled = fpo.pooled_features(sae.encode(reference_hidden.float()), mask)
        union = fpo.top_activated(pooled, k) | fpo.top_activated(reference_pooled, k)  # I(y)
        total = total + ((pooled - reference_pooled).pow(2) * union).sum(0).cpu() / k
        n_responses += len(input_ids)
    return total / n_responses


@torch.no_grad()
def attribute_latents(
    model: GPT, sae, layer: int, batches, enc, n: int
) -> dict[str, list[int]]:
    """The n SAE latents that most separate each attribute the judge scores, read where the model
    decides a word: at the positions that generate a response token (as pooled(y) reads them).
    - positive (negative): positions generating a positive word against those generating a
      negative one, by how much higher (lower) their mean activation is, over the pooled
      standard deviation;
    - topic: positions generating a noun, grouped by the noun's topic, by the variance of the
      topics' mean activations over the mean variance within a topic.
    batches: (input_ids (B, T), response_mask (B, T)) pairs. Returns {"positive": [...],
    "negative": [...], "topic": [...]}, each sorted by latent number."""
    def single_tokens(words) -> list[int]:
        ids = [data.encode(enc, " " + word) for word in words]
        return [token[0] for token in ids if len(token) == 1]

    positive = torch.tensor(single_tokens(data.POSITIVE_ADJECTIVES + data.POSITIVE_VERBS))
    negative = torch.tensor(single_tokens(data.NEGATIVE_ADJECTIVES + data.NEGATIVE_VERBS))
    topic_nouns = [torch.tensor(single_tokens(nouns)) for nouns in data.TOPICS.values()]
    codes, next_tokens = [], []
    for input_ids, mask in batches:
        _, hidden = model(input_ids, hidden_layer=layer)
        generating = mask[:, 1:].bool()  # position t generates response token t+1
        codes.append(sae.encode(hidden[:, :-1][generating].float()).cpu())  # (N, d_sae)
        next_tokens.append(input_ids[:, 1:][generating].cpu())  # (N,)
    codes, next_tokens = torch.cat(codes), torch.cat(next_tokens)
    on_positive = codes[torch.isin(next_tokens, positive)]
    on_negative = codes[torch.isin(next_tokens, negative)]
    spread = ((on_positive.var(0) + on_negative.var(0)) / 2).sqrt() + 1e-6
    sentiment_gap = (on_positive.mean(0) - on_negative.mean(0)) / spread  # (d_sae,)
    by_topic = [codes[torch.isin(next_tokens, nouns)] for nouns in topic_nouns]
    between = torch.stack([group.mean(0) for group in by_topic]).var(0)  # (d_sae,)
    within = torch.stack([group.var(0) for group in by_topic]).mean(0) + 1e-6
    return {
        "positive": sorted(sentiment_gap.topk(n).indices.tolist()),
        "negative": sorted((-sentiment_gap).topk(n).indices.tolist()),
        "topic": sorted((between / within).topk(n).indices.tolist()),
    }
