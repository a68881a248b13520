"""The metrics: what a policy learned, measured against the frozen reference.

Sampling on held-out prompts, the toy world's judge (win rate, score, validity, on topic,
positive), KL(policy || reference) on the policy's own samples, entropy, distinct-2, and paired
bootstrap differences. train.py's eval stage loads the models and calls these; so do the
experiments. `python evaluate.py DIR...` tabulates finished `python train.py` runs.
"""

import dataclasses
from collections import Counter
from pathlib import Path

import torch

import data
import fpo
import report
from config import ArgumentParser, EvalConfig, run_command
from model import GPT
from runtime import UsageError, autocast, read_json, step_generator

# ----------------------------------------------------------------------------------------------
# Sampling and scoring samples


@torch.no_grad()
def sample_responses(
    model: GPT,
    prompts: list[list[int]],
    enc,
    eval_cfg: EvalConfig,
    seed: int,
    device,
) -> list[list[int]]:
    """One sampled response per prompt: token ids up to and including the first EOS (none if the
    sample ran out of room). Prompts of equal length are batched together; the random stream
    depends only on the seed and the prompt length, so policy and reference see the same draws."""
    eos = data.eos_id(enc)
    responses = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, members in sorted(by_length.items()):
        idx = torch.tensor([[eos] + prompts[i] for i in members], device=device)
        new_tokens = min(eval_cfg.max_new_tokens, model.config.block_size - idx.shape[1])
        with autocast(device):
            out = model.generate(
                idx,
                new_tokens,
                eval_cfg.temperature,
                eval_cfg.top_k or None,
                eos,
                step_generator(seed, length, device),
            )
        for i, row in zip(members, out.tolist()):
            response = row[idx.shape[1] :]
            responses[i] = response[: response.index(eos) + 1] if eos in response else response
    return responses


@torch.no_grad()
def score_samples(model: GPT, reference: GPT, prompts, responses, eos_id: int, device) -> dict:
    """On the given responses: the model's entropy per response token, and the mean over responses
    of sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) over the whole vocabulary. By the chain rule,
    on the model's own samples drawn at temperature 1 with no top-k, that mean estimates
    KL(pi || pi_ref) of whole responses without bias (and it is never negative)."""
    entropies, kls = [], []
    for start in range(0, len(prompts), 64):
        input_ids, mask = data.collate_responses(
            prompts[start : start + 64], responses[start : start + 64], eos_id
        )
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits, _ = model(input_ids)
        reference_logits, _ = reference(input_ids)
        kls.append(fpo.sequence_kl(p_logits=logits, q_logits=reference_logits, response_mask=mask))
        token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        token_entropy = -(token_logps.exp() * token_logps).sum(-1)  # (B, T-1)
        entropies.append(token_entropy[mask[:, 1:].bool()])
    entropies = torch.cat(entropies)  # every sampled response token; none if every sample was empty
    return {
        "entropy_per_token": entropies.sum().item() / max(1, len(entropies)),
        "kl_from_reference": torch.cat(kls).mean().item(),
    }


def win_rate(policy_scores: list[float], reference_scores: list[float]) -> float:
    """How often the policy's response to a prompt scores higher than the reference's; ties count
    half."""
    wins = [
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(policy_scores, reference_scores, strict=True)
    ]
    return sum(wins) / len(wins)


def distinct_2(responses: list[list[int]]) -> float:
    """Unique token bigrams over all bigrams of the samples: 1 = no repetition across samples."""
    bigrams = [tuple(r[i : i + 2]) for r in responses for i in range(len(r) - 1)]
    return len(set(bigrams)) / max(1, len(bigrams))


# ----------------------------------------------------------------------------------------------
# The judge: the toy world's held-out prompts, and its verdicts on the samples


def eval_prompt_texts(eval_cfg: EvalConfig, seed: int) -> list[str]:
    """The prompts the judge scores: eval_cfg.n_eval_prompts distinct prompts (0: all) of the
    eval_cfg.eval_split split, whose nouns no training pair uses."""
    return data.make_prompts(eval_cfg.n_eval_prompts, seed=seed, split=eval_cfg.eval_split)


def judge_stats(prompt_texts: list[str], responses: list[list[int]], enc) -> dict:
    """The judge's verdict on each response, averaged over all responses: judge score, valid,
    on-topic and positive rates; `scores` keeps each prompt's score for the win rate. A response
    cut off before EOS counts as invalid."""
    eos = data.eos_id(enc)
    verdicts = [
        data.judge(text, data.response_text(enc, r), complete=r[-1:] == [eos])
        for text, r in zip(prompt_texts, responses, strict=True)
    ]
    n = len(verdicts)
    return {
        "judge_score": sum(v.score for v in verdicts) / n,
        "valid_rate": sum(v.valid for v in verdicts) / n,
        "on_topic_rate": sum(v.on_topic for v in verdicts) / n,
        "positive_rate": sum(v.positive for v in verdicts) / n,
        "scores": [v.score for v in verdicts],
    }


def sample_stats(
    model: GPT,
    reference: GPT,
    prompts: list[list[int]],
    prompt_texts: list[str] | None,
    responses: list[list[int]],
    enc,
    eval_cfg: EvalConfig,
    seed: int,
    device,
) -> dict:
    """Everything measured on one model's samples: entropy, KL from the reference, distinct-2,
    length, and the judge's statistics when prompt_texts are the toy world's (None: no judge)."""
    eos = data.eos_id(enc)
    stats = score_samples(model, reference, prompts, responses, eos, device)
    own_sampling = dataclasses.replace(eval_cfg, temperature=1.0, top_k=0)
    if own_sampling != eval_cfg:  # KL(pi || pi_ref) needs pi's own samples at temperature 1
        own_samples = sample_responses(model, prompts, enc, own_sampling, seed, device)
        own_stats = score_samples(model, reference, prompts, own_samples, eos, device)
        stats["kl_from_reference"] = own_stats["kl_from_reference"]
    stats["distinct_2"] = distinct_2(responses)
    stats["mean_length"] = sum(map(len, responses)) / len(responses)
    if prompt_texts is not None:
        stats.update(judge_stats(prompt_texts, responses, enc))
    return stats


def encode_prompts(prompt_texts: list[str], enc, block_size: int) -> list[list[int]]:
    """The prompts' token ids, each cut to its last half context: the rest is the response's."""
    return [data.encode(enc, text)[-(block_size // 2) :] for text in prompt_texts]


def judge_against_reference(
    policy: GPT,
    reference: GPT,
    prompt_texts: list[str],
    judged: bool,
    enc,
    eval_cfg: EvalConfig,
    seed: int,
    device,
    reference_samples: dict,
) -> dict:
    """Sample policy and reference once per prompt and compare: each one's sample_stats, the
    judge's per-prompt wins and win rate (when `judged`), and five examples. The reference's
    samples and stats go into reference_samples once and are reused from there."""
    prompts = encode_prompts(prompt_texts, enc, policy.config.block_size)
    judged_texts = prompt_texts if judged else None
    if "responses" not in reference_samples:  # the reference's samples and their stats: once
        responses = sample_responses(reference, prompts, enc, eval_cfg, seed, device)
        reference_samples["responses"] = responses
        reference_samples["stats"] = sample_stats(
            reference, reference, prompts, judged_texts, responses, enc, eval_cfg, seed, device
        )
    policy_responses = sample_responses(policy, prompts, enc, eval_cfg, seed, device)
    results = {
        "policy": sample_stats(
            policy, reference, prompts, judged_texts, policy_responses, enc, eval_cfg, seed, device
        ),
        "reference": dict(reference_samples["stats"]),
    }
    if judged:  # per prompt, for the paired differences of the experiments
        policy_scores = results["policy"].pop("scores")
        reference_scores = results["reference"].pop("scores")
        results["prompt_wins"] = [
            win_rate([p], [r]) for p, r in zip(policy_scores, reference_scores, strict=True)
        ]
        results["win_rate"] = sum(results["prompt_wins"]) / len(results["prompt_wins"])
    examples = zip(prompt_texts, reference_samples["responses"], policy_responses)
    results["examples"] = [
        {
            "prompt": text,
            "reference": data.response_text(enc, reference_response),
            "policy": data.response_text(enc, policy_response),
        }
        for text, reference_response, policy_response in list(examples)[:5]
    ]
    return results


# ----------------------------------------------------------------------------------------------
# Comparisons and features


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


def most_constrained_latents(cache: dict, fpo_k: int, n: int) -> list[int]:
    """The latents most often among the reference's top-fpo_k pooled features (half of the union
    I(y) in D(y)), counted over every cached response."""
    counts = Counter()
    offsets = cache["feature_offsets"]
    indices = cache["feature_indices"]
    values = cache["feature_values"]
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        top = values[start:end].topk(min(fpo_k, end - start)).indices
        counts.update(indices[start:end][top].tolist())
    return [latent for latent, _ in counts.most_common(n)]


@torch.no_grad()
def attribute_latents(
    model: GPT, sae, layer: int, batches, enc, n: int
) -> dict[str, list[int]]:
    """The n SAE latents that most separate each attribute the judge scores, read where the model
    decides a word: at the positions that generate a response token (as pooled(y) reads them).
    - sentiment: positions generating a positive word against those generating a negative one,
      by the gap of their mean activations over the pooled standard deviation;
    - topic: positions generating a noun, grouped by the noun's topic, by the variance of the
      topics' mean activations over the mean variance within a topic.
    batches: (input_ids (B, T), response_mask (B, T)) pairs. Returns {"sentiment": [...],
    "topic": [...]}, each sorted by latent number."""
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
    sentiment_gap = (on_positive.mean(0) - on_negative.mean(0)).abs() / spread  # (d_sae,)
    by_topic = [codes[torch.isin(next_tokens, nouns)] for nouns in topic_nouns]
    between = torch.stack([group.mean(0) for group in by_topic]).var(0)  # (d_sae,)
    within = torch.stack([group.var(0) for group in by_topic]).mean(0) + 1e-6
    return {
        "sentiment": sorted(sentiment_gap.topk(n).indices.tolist()),
        "topic": sorted((between / within).topk(n).indices.tolist()),
    }


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
    response (B of them): `feature_drift`, D(y) over top-fpo_k pooled codes, and `sequence_kl`,
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
        "feature_drift": fpo.feature_mse(pooled, reference_pooled, fpo_k),
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
# `python evaluate.py OUT_DIR...`: the per-seed table of finished runs (docs/seeds.md)


def read_run(out_dir: Path) -> dict:
    """out_dir/results.json of a finished `python train.py` run, or one `error:` line naming what
    is wrong: the directory, or a results.json that is missing, not a file (the type is checked
    before opening: reading a FIFO would wait forever), not JSON, or not a run's results."""
    finished_run = "give the --out_dir of a finished `python train.py` run"
    how_to_make = f"run `python train.py --out_dir {out_dir}` to the end (its eval stage writes it)"
    path = out_dir / "results.json"
    try:
        if not out_dir.is_dir():
            problem = "is not a directory" if out_dir.exists() else "not found"
            raise UsageError(f"{out_dir} {problem}: {finished_run}")
        if path.exists() and not path.is_file():
            raise UsageError(f"{path} is not a regular file: {finished_run}")
    except OSError as error:  # no permission to look, a name too long
        raise UsageError(f"{out_dir} cannot be read ({error.strerror}): {finished_run}") from None
    run = read_json(path, how_to_make)
    if not isinstance(run, dict):
        kind = type(run).__name__
        raise UsageError(f"{path} holds a JSON {kind}, not a run's results: {finished_run}")
    lacks = [key for key in ("seed", "cpu_threads") if not isinstance(run.get(key), int)]
    if lacks:
        raise UsageError(
            f"{path} is not a `python train.py` results.json (no integer {' or '.join(lacks)}): "
            f"{finished_run}"
        )
    return run


def main(argv: list[str]) -> None:
    """Print the Markdown table of the runs in argv's directories (report.runs_table)."""
    parser = ArgumentParser(
        prog="evaluate.py",
        description="Tabulate finished `python train.py` runs: one Markdown row per OUT_DIR, "
        "then the mean ± std of each column; `-` where a run has no value (a run on your own "
        "data has no judge metrics)."
    )
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="holds a results.json")
    out_dirs = [Path(out_dir) for out_dir in parser.parse_args(argv).out_dirs]
    runs = [read_run(out_dir) for out_dir in out_dirs]
    print(report.runs_table([out_dir.name for out_dir in out_dirs], runs), end="")


if __name__ == "__main__":
    run_command(main)
