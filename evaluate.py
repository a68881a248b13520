"""The metrics: what a policy learned, measured against the frozen reference.

Sampling on held-out prompts, the toy world's judge (win rate, score, validity, on topic,
positive), KL(policy || reference) on the policy's own samples, entropy and distinct-2, and the
summary `python train.py` prints. train.py's eval stage loads the models and calls these.
"""

import dataclasses
from pathlib import Path

import torch

import data
import fpo
from config import EvalConfig
from model import GPT
from runtime import autocast, step_generator

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
            generator = step_generator(seed, length, device)
            out = model.generate(idx, new_tokens, eval_cfg.temperature, eval_cfg.top_k or None,
                                 eos, generator)
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
        batch = slice(start, start + 64)
        input_ids, mask = data.collate_responses(prompts[batch], responses[batch], eos_id)
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
    """How often the policy's response scores higher than the reference's; ties count half."""
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
    """The judge's verdicts averaged over responses: judge score, valid, on-topic and positive rates
    (a response cut off before EOS is invalid); `scores`, `on_topic` and `positive` per prompt."""
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
        "scores": [v.score for v in verdicts],  # for win rates
        "on_topic": [v.on_topic for v in verdicts],  # for the experiments' paired intervals
        "positive": [v.positive for v in verdicts],
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
    reference_samples: dict | None = None,
) -> dict:
    """Sample policy and reference once per prompt and compare: each one's sample_stats, the
    judge's per-prompt wins and win rate (when `judged`), and five examples. The reference's
    samples and stats go into reference_samples once and are reused from there."""
    reference_samples = {} if reference_samples is None else reference_samples
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
# The eval stage's printout (`python train.py` ends with it)


def summary_text(results: dict, path: Path) -> str:
    """The end of `python train.py`: held-out accuracy, sample statistics, win rate, 3 examples."""
    lines = [
        "\n== summary ==",
        f"method {results['method']} | held-out reward accuracy: "
        f"its own reward {results['reward_accuracy']:.3f}, "
        f"implicit DPO reward {results['implicit_reward_accuracy']:.3f} | "
        f"feature MSE D(y) {results['feature_mse']:.4g}",
    ]
    for name in ("policy", "reference"):
        stats = results[name]
        judged = ""
        if "judge_score" in stats:
            judged = (
                f"judge score {stats['judge_score']:.3f} | valid {stats['valid_rate']:.3f} | "
                f"on topic {stats['on_topic_rate']:.3f} | positive {stats['positive_rate']:.3f} | "
            )
        lines.append(
            f"{name:<9} | {judged}length {stats['mean_length']:.1f} | "
            f"entropy {stats['entropy_per_token']:.3f} | distinct-2 {stats['distinct_2']:.3f} | "
            f"KL from reference {stats['kl_from_reference']:.3f}"
        )
    if "win_rate" in results:
        lines.append(
            "win rate of the policy over the reference (judge, ties count half): "
            f"{results['win_rate']:.3f}"
        )
    for example in results["examples"][:3]:
        lines.append(f"  prompt: {example['prompt']!r}")
        lines.append(f"    reference: {example['reference']!r}")
        lines.append(f"    policy:    {example['policy']!r}")
    lines.append(f"results: {path}")
    return "\n".join(lines)
