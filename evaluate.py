"""Evaluation and the evidence: what the policy learned, and FPO against its baselines.

- `evaluate`: the eval stage of train.py: judge win rate, validity, reward accuracy, feature drift,
  KL, entropy and diversity on held-out prompts and pairs; `feature_report`: the features stage.
- `sweep` (`python train.py --sweep`): every method at 9 settings of its own knobs, judged on the
  validation prompts along twice the default length; each method's pick; the reward-KL frontier and
  the over-optimisation curves as SVG files.
- `compare` (`python train.py --compare`): every method at its pick (or COMPARE_ROWS without a
  sweep) for --seeds seeds, same data and hardware: one table, and paired differences from FPO.
- `bench` (`python train.py --bench`): step times on identical batches and each training loop's
  peak memory.
- `python evaluate.py DIR...`: the table of finished `python train.py` runs.
"""

import dataclasses
import json
import math
import multiprocessing
import re
import resource
import statistics
import sys
import time
import weakref
from collections import Counter
from html import escape
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
import fpo
import train
from runtime import UsageError, autocast, batch_indices, check_made_from, load_checkpoint, step_generator, synchronize
from model import GPT, GPTConfig
from sae import top_activating_contexts

# ----------------------------------------------------------------------------------------------
# The eval stage: held-out prompts and pairs.


@torch.no_grad()
def sample_responses(model: GPT, prompts: list[list[int]], enc, ev: train.EvalConfig, seed: int, device) -> list[list[int]]:
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
        new_tokens = min(ev.max_new_tokens, model.config.block_size - idx.shape[1])
        with autocast(device):
            out = model.generate(idx, new_tokens, ev.temperature, ev.top_k or None, eos, step_generator(seed, length, device)).tolist()
        for i, row in zip(members, out):
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
        input_ids, mask = data.collate_responses(prompts[start : start + 64], responses[start : start + 64], eos_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits, _ = model(input_ids)
        reference_logits, _ = reference(input_ids)
        kls.append(fpo.sequence_kl(reference_logits, logits, mask))  # sequence_kl(q, p) = sum_t KL(p || q): here KL(pi || pi_ref)
        token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        token_entropy = -(token_logps.exp() * token_logps).sum(-1)  # (B, T-1)
        entropies.append(token_entropy[mask[:, 1:].bool()])
    entropies = torch.cat(entropies)  # every sampled response token; none if every sample was empty
    return {"entropy_per_token": entropies.sum().item() / max(1, len(entropies)), "kl_from_reference": torch.cat(kls).mean().item()}


def win_rate(policy_scores: list[float], reference_scores: list[float]) -> float:
    """How often the policy's response to a prompt scores higher than the reference's; ties count half."""
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, reference_scores, strict=True)]
    return sum(wins) / len(wins)


def distinct_2(responses: list[list[int]]) -> float:
    """Unique token bigrams over all bigrams of the samples: 1 = no repetition across samples."""
    bigrams = [tuple(r[i : i + 2]) for r in responses for i in range(len(r) - 1)]
    return len(set(bigrams)) / max(1, len(bigrams))


def evaluate(cfg: train.Config, device, seed: int, tag: str = "policy", reference_samples: dict | None = None) -> dict:
    """Judge win rate, judge score and validity on held-out prompts; reward accuracy and feature
    drift on held-out pairs; KL, entropy, distinct-2 and length of the samples. The reference's
    samples depend only on the seed: pass the same dict to reuse them across methods. The policy's
    own training settings (saved in <tag>.pt) decide its loss terms, and are recorded."""
    print(f"\n== eval: {tag} ==")
    reference, gpt_fingerprint = train.load_gpt(cfg, device)
    reference.eval().requires_grad_(False)
    inputs = train.load_preference_inputs(cfg, reference, gpt_fingerprint, device)
    path = Path(cfg.run.out_dir) / f"{tag}.pt"
    ckpt = load_checkpoint(path, "policy", "run `python train.py --stage prefer` first")
    if ckpt["model_config"] != asdict(reference.config):
        raise UsageError(f"{path} was trained from another GPT than {cfg.run.out_dir}/gpt.pt: rerun `--stage prefer`")
    check_made_from(path, ckpt, inputs.made_from, "rerun `--stage prefer`")
    trained = made_with(train.PreferenceConfig, ckpt["config"])
    policy = GPT(GPTConfig(**ckpt["model_config"])).to(device)
    policy.load_state_dict(ckpt["state_dict"])
    policy.eval().requires_grad_(False)

    accuracies, implicit_accuracies, drifts = [], [], []
    for batch in data.every_pair(inputs.test_pairs, 64, len(inputs.train_pairs), data.eos_id(inputs.enc), device):
        rows, input_ids, mask = batch
        with autocast(device):
            _, chosen_rewards, rejected_rewards, drift = train.preference_losses(trained, cfg.sae.sae_layer, policy, batch, inputs, reference)
            if drift is None:  # FPO computed it for its loss; the other methods measure it here
                drift = train.measure_drift(trained, cfg.sae.sae_layer, policy, batch, inputs)
            drifts.append(drift)
            # One measure for every method: the implicit DPO reward beta * (log pi(y) - log pi_ref(y)),
            # summed log-probs; beta > 0 does not change which response it ranks higher.
            logits, _ = policy(input_ids)
            implicit_reward = fpo.sequence_logps(logits, input_ids, mask)[0] - inputs.cache["sum_logps"][rows.cpu()].to(device)
        B = len(rows) // 2
        accuracies.append((chosen_rewards > rejected_rewards).float())
        implicit_accuracies.append((implicit_reward[:B] > implicit_reward[B:]).float())
    results = {
        "method": trained.method, "seed": seed, "feature_drift": torch.cat(drifts).mean().item(),
        "reward_accuracy": torch.cat(accuracies).mean().item(),  # with the method's own reward
        "implicit_reward_accuracy": torch.cat(implicit_accuracies).mean().item(),  # with the implicit DPO reward
    }

    enc, eos, has_judge = inputs.enc, data.eos_id(inputs.enc), not cfg.run.preference_file  # the judge knows only the toy world
    prompt_texts = data.make_prompts(cfg.eval.n_eval_prompts, seed=cfg.run.seed, split=cfg.eval.eval_split) if has_judge else [enc.decode(p.prompt_ids) for p in inputs.test_pairs]
    prompts = [data.encode(enc, text)[-(cfg.pretrain.block_size // 2) :] for text in prompt_texts]  # keep half the context to respond
    own_sampling = dataclasses.replace(cfg.eval, temperature=1.0, top_k=0)  # KL(pi || pi_ref) needs pi's own samples

    def sample_stats(model: GPT, responses: list[list[int]]) -> dict:
        stats = score_samples(model, reference, prompts, responses, eos, device)
        if own_sampling != cfg.eval:  # judged at other sampling settings: the KL needs samples of its own
            own_samples = sample_responses(model, prompts, enc, own_sampling, seed, device)
            stats["kl_from_reference"] = score_samples(model, reference, prompts, own_samples, eos, device)["kl_from_reference"]
        stats.update(distinct_2=distinct_2(responses), mean_length=sum(map(len, responses)) / len(responses))
        if has_judge:
            verdicts = [data.judge(text, data.response_text(enc, r), complete=r[-1:] == [eos]) for text, r in zip(prompt_texts, responses)]
            n = len(verdicts)
            stats.update(
                judge_score=sum(v.score for v in verdicts) / n, valid_rate=sum(v.valid for v in verdicts) / n,
                on_topic_rate=sum(v.on_topic for v in verdicts) / n, positive_rate=sum(v.positive for v in verdicts) / n,
                scores=[v.score for v in verdicts],
            )
        return stats

    reference_samples = {} if reference_samples is None else reference_samples
    if "responses" not in reference_samples:  # the reference's samples and their stats: once per seed
        reference_samples["responses"] = sample_responses(reference, prompts, enc, cfg.eval, seed, device)
        reference_samples["stats"] = sample_stats(reference, reference_samples["responses"])
    policy_responses = sample_responses(policy, prompts, enc, cfg.eval, seed, device)
    results["policy"], results["reference"] = sample_stats(policy, policy_responses), dict(reference_samples["stats"])
    if has_judge:  # per prompt, for the paired differences of --compare
        results["prompt_wins"] = [win_rate([p], [r]) for p, r in zip(results["policy"].pop("scores"), results["reference"].pop("scores"), strict=True)]
        results["win_rate"] = sum(results["prompt_wins"]) / len(results["prompt_wins"])
    results["examples"] = [
        {"prompt": t, "reference": data.response_text(enc, r), "policy": data.response_text(enc, p)}
        for t, r, p in list(zip(prompt_texts, reference_samples["responses"], policy_responses))[:5]
    ]
    results["trained_with"], results["cpu_threads"] = ckpt["config"], torch.get_num_threads()
    # Every config section of this command, but the settings gpt.pt, sae.pt and the policy were made
    # with: `--resume` skips finished stages, whatever their flags say now.
    out = Path(cfg.run.out_dir)
    results["config"] = {type(section).__name__: asdict(section) for section in vars(cfg).values()} | {
        "PretrainConfig": asdict(made_with(train.PretrainConfig, load_checkpoint(out / "gpt.pt", "gpt", "")["config"])),
        "SAEConfig": asdict(made_with(train.SAEConfig, load_checkpoint(out / "sae.pt", "sae", "")["config"])),
        "PreferenceConfig": asdict(trained),
    }
    return results


def made_with(section_type: type, settings: dict):
    """A config section as a checkpoint saved it (`train.stage_settings`), without the extra keys."""
    return section_type(**{key: value for key, value in settings.items() if key in section_type.__dataclass_fields__})


def eval_stage(cfg: train.Config, device) -> None:
    """evaluate() the policy; write results.json and print a summary."""
    results = evaluate(cfg, device, seed=cfg.run.seed)
    path = Path(cfg.run.out_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print_summary(results, path)


def print_summary(results: dict, path: Path) -> None:
    print("\n== summary ==")
    print(
        f"method {results['method']} | held-out reward accuracy: its own reward {results['reward_accuracy']:.3f}, "
        f"implicit DPO reward {results['implicit_reward_accuracy']:.3f} | feature drift {results['feature_drift']:.4g}"
    )
    for name in ("policy", "reference"):
        stats = results[name]
        judged = (
            f"judge score {stats['judge_score']:.3f} | valid {stats['valid_rate']:.3f} | on topic {stats['on_topic_rate']:.3f} | "
            f"positive {stats['positive_rate']:.3f} | " if "judge_score" in stats else ""
        )
        print(
            f"{name:<9} | {judged}length {stats['mean_length']:.1f} | entropy {stats['entropy_per_token']:.3f} | "
            f"distinct-2 {stats['distinct_2']:.3f} | KL from reference {stats['kl_from_reference']:.3f}"
        )
    if "win_rate" in results:
        print(f"win rate of the policy over the reference (judge, ties count half): {results['win_rate']:.3f}")
    for example in results["examples"][:3]:
        print(f"  prompt: {example['prompt']!r}\n    reference: {example['reference']!r}\n    policy:    {example['policy']!r}")
    print(f"results: {path}")


def feature_report(cfg: train.Config, device) -> None:
    """What the SAE latents mean: for each, the held-out response tokens that activate it most."""
    print("\n== features ==")
    model, gpt_fingerprint = train.load_gpt(cfg, device)
    inputs = train.load_preference_inputs(cfg, model, gpt_fingerprint, device)
    latents = [int(latent) for latent in cfg.run.latents.split(",")] if cfg.run.latents else most_constrained_latents(inputs.cache, cfg.prefer.fpo_k, n=8)
    if not cfg.run.latents:
        print(f"features: the {len(latents)} latents most often in the reference's top-{cfg.prefer.fpo_k} pooled features")
    batches = ((input_ids, mask) for _, input_ids, mask in data.every_pair(inputs.test_pairs, 64, 0, data.eos_id(inputs.enc), device))
    report = top_activating_contexts(model, inputs.sae, batches, cfg.sae.sae_layer, latents, inputs.enc.decode)
    path = Path(cfg.run.out_dir) / "features.txt"
    path.write_text(report + "\n")
    print(f"{report}\nfeatures: wrote {path}")


def most_constrained_latents(cache: dict, fpo_k: int, n: int) -> list[int]:
    """The latents most often among the reference's top-fpo_k pooled features (half of the union
    I(y) in D(y)), counted over every cached response."""
    counts = Counter()
    offsets, indices, values = cache["feature_offsets"], cache["feature_indices"], cache["feature_values"]
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        top = values[start:end].topk(min(fpo_k, end - start)).indices
        counts.update(indices[start:end][top].tolist())
    return [latent for latent, _ in counts.most_common(n)]


# ----------------------------------------------------------------------------------------------
# --compare and --bench

# Per-method settings for --bench, and for --compare without a --sweep: FPO at the defaults (from
# its sweep grid), the baselines as in their papers. beta is on the scale of each method's log-probs:
# summed for DPO and TDPO, averaged (about 15x smaller here) for FPO and SimPO.
COMPARE_ROWS = {
    "FPO": {"method": "fpo", "beta": 2.0, "alpha": 16.0},
    "FPO (alpha=0)": {"method": "fpo", "beta": 2.0, "alpha": 0.0},
    "DPO": {"method": "dpo", "beta": 0.1},
    "DPO (offline cache)": {"method": "dpo_offline", "beta": 0.1},
    "SimPO": {"method": "simpo", "beta": 2.0, "gamma": 0.5},
    "TDPO-1": {"method": "tdpo1", "beta": 0.1},
    "TDPO-2": {"method": "tdpo2", "beta": 0.1, "alpha": 0.5},
}
TABLE_COLUMNS = {  # column: (results key path, digits)
    "win rate": (("win_rate",), 3),
    "judge score": (("policy", "judge_score"), 3),
    "valid": (("policy", "valid_rate"), 3),
    "reward acc (own)": (("reward_accuracy",), 3),
    "reward acc (DPO)": (("implicit_reward_accuracy",), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
    "entropy": (("policy", "entropy_per_token"), 3),
    "distinct-2": (("policy", "distinct_2"), 3),
    "length": (("policy", "mean_length"), 1),
    "feature drift": (("feature_drift",), 4),
    "ms/step": (("median_step_ms",), 1),
}


def with_method(cfg: train.Config, overrides: dict) -> train.Config:
    """cfg with one COMPARE_ROWS entry's preference settings."""
    return dataclasses.replace(cfg, prefer=dataclasses.replace(cfg.prefer, **overrides))


def compare_tag(label: str, seed: int) -> str:
    return "compare_" + re.sub(r"\W+", "_", label.lower()).strip("_") + f"_seed{seed}"


# ----------------------------------------------------------------------------------------------
# Memory: the peak over the training loop alone, with everything it needs already loaded.


class LiveTensorBytes(TorchDispatchMode):
    """While active, the bytes of every tensor storage an op allocates, until it is freed: `peak`
    is the most that was live at once, counting nothing allocated before (weights, data, cache).
    Outputs that alias an input (views, in-place updates) allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.tracked = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if id(storage) in self.tracked or storage.data_ptr() in inputs:
                continue
            self.tracked.add(id(storage))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, id(storage), storage.nbytes())  # runs when the storage is freed
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes


class LoopPeakMemory:
    """Around a training loop (train_preference's `measure`), two peaks in MB:
    - `loop_mb`, the loop's own: on CUDA max allocated above what was allocated on entering; on the
      CPU and MPS the peak of live tensor bytes allocated inside the loop (LiveTensorBytes);
    - `rss_mb`, the whole process's peak resident set size (since entering on Linux, over its
      lifetime elsewhere): torch, data and cache included, which every method holds alike."""

    def __init__(self, device: torch.device):
        self.device, self.loop_mb, self.rss_mb = device, float("nan"), float("nan")
        self.tensors = LiveTensorBytes()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_before = torch.cuda.memory_allocated(self.device)
        else:
            self.tensors.__enter__()
        if Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.loop_mb = (torch.cuda.max_memory_allocated(self.device) - self.allocated_before) / 2**20
        else:
            self.tensors.__exit__(*exc)
            self.loop_mb = self.tensors.peak / 2**20
        if Path("/proc/self/status").exists():
            self.rss_mb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**10
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.rss_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere
        return False


def train_and_measure(cfg: train.Config, device, seed: int, tag: str) -> dict:
    """train_preference, with its median step time and its loop's peak memory."""
    memory = LoopPeakMemory(device)
    cost = train.train_preference(cfg, device, seed, tag, measure=memory)
    return cost | {"loop_memory_mb": memory.loop_mb, "peak_rss_mb": memory.rss_mb}


def in_child_process(function, *args):
    """Run function(*args) in a fresh process and return its result, so peak memory is the
    method's own and nothing (allocator state, caches) leaks from one method to the next. The child
    uses this process's CPU thread count (--threads), which decides how reductions round."""
    with multiprocessing.get_context("spawn").Pool(1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as pool:
        return pool.apply(function, args)


# ----------------------------------------------------------------------------------------------
# --sweep: every method tuned alike on validation prompts; the reward-KL frontier; over-optimisation

# Every method gets the same budget: 3 learning rates x 3 settings of its other knobs (beta, and
# gamma for SimPO or alpha for FPO and TDPO-2) = 9 runs, each
# evaluated at 6 points along twice the default length, so the pick also chooses when to stop.
# beta is on the scale of each method's log-probs: summed for DPO and TDPO, averaged (about 15x
# smaller) for FPO and SimPO. FPO's D(y) scales with the SAE's activations, so its alpha is searched
# over decades rather than taken from the paper.
SWEEP_LRS = (2e-5, 6e-5, 1.8e-4)
SWEEP_KNOBS = {
    "FPO": [{"method": "fpo", "beta": beta, "alpha": alpha} for beta, alpha in ((2.0, 4.0), (2.0, 16.0), (4.0, 16.0))],
    "DPO": [{"method": "dpo", "beta": beta} for beta in (0.05, 0.1, 0.3)],
    "DPO (offline cache)": [{"method": "dpo_offline", "beta": beta} for beta in (0.05, 0.1, 0.3)],
    "SimPO": [{"method": "simpo", "beta": beta, "gamma": gamma} for beta, gamma in ((2.0, 0.5), (2.0, 1.5), (4.0, 1.0))],
    "TDPO-1": [{"method": "tdpo1", "beta": beta} for beta in (0.05, 0.1, 0.3)],
    "TDPO-2": [{"method": "tdpo2", "beta": beta, "alpha": alpha} for beta, alpha in ((0.1, 0.5), (0.1, 2.0), (0.3, 2.0))],
}
ALPHA_ABLATION = (0.0, 1.0, 4.0, 16.0, 64.0)  # FPO at the default --pref_lr, read at the default length
VALIDITY_FLOOR = 0.9  # a pick must keep at least this share of the reference's valid rate
POINT_KEYS = {"judge_score": ("policy", "judge_score"), "valid_rate": ("policy", "valid_rate"),
              "kl_from_reference": ("policy", "kl_from_reference"), "win_rate": ("win_rate",)}


def sweep_tag(overrides: dict) -> str:
    return "sweep_" + "_".join(f"{key}{value:g}" if isinstance(value, float) else str(value) for key, value in overrides.items())


def sweep(cfg: train.Config, device) -> None:
    """Train every method at each setting of its grid for twice --pref_steps, judge the validation
    prompts every third of --pref_steps, and pick per method the (setting, length) with the highest
    judge score among those keeping VALIDITY_FLOOR of the reference's validity. Finished runs are
    skipped on a rerun. Writes sweep_picks.json (what --compare runs), sweep.md and three SVGs."""
    out, every = Path(cfg.run.out_dir), max(1, cfg.prefer.pref_steps // 3)
    pretrain_if_missing(cfg, device)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, eval_split="validation"))
    grid = [(label, knobs | {"pref_lr": lr}) for label, all_knobs in SWEEP_KNOBS.items() for knobs in all_knobs for lr in SWEEP_LRS]
    grid += [("FPO alpha ablation", {"method": "fpo", "beta": cfg.prefer.beta, "alpha": alpha, "pref_lr": cfg.prefer.pref_lr}) for alpha in ALPHA_ABLATION]
    print(f"\n== sweep: {len(grid)} runs of {2 * cfg.prefer.pref_steps} steps, judged every {every} steps on validation prompts ==")
    runs, reference_samples, started = {}, {}, time.time()
    gpt_fingerprint = train.load_gpt(cfg, device)[1]
    # A finished run counts only for this reference GPT and SAE, its training settings and the judging.
    made_from = {"GPT": gpt_fingerprint, "SAE": train.load_trained_sae(cfg, gpt_fingerprint, device)[1], "eval": dataclasses.asdict(cfg.eval)}
    for number, (label, overrides) in enumerate(grid, 1):
        tag = sweep_tag(overrides)
        path = out / f"{tag}_results.json"
        print(f"sweep: run {number}/{len(grid)} ({label}, {overrides}) | {time.time() - started:.0f}s", flush=True)
        run_cfg = with_method(cfg, overrides | {"pref_steps": 2 * cfg.prefer.pref_steps})
        run_made_from = made_from | {"settings": train.stage_settings(run_cfg, "prefer")}
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("made_from") == run_made_from:
            runs[tag] = saved
            continue
        train.train_preference(run_cfg, device, cfg.run.seed, tag, snapshot_every=every)
        points = []
        for step in range(every, 2 * cfg.prefer.pref_steps + 1, every):
            results = evaluate(run_cfg, device, cfg.run.seed, f"{tag}_step{step}", reference_samples)
            points.append({"step": step} | {key: nested(results, key_path) for key, key_path in POINT_KEYS.items()})
            (out / f"{tag}_step{step}.pt").unlink()
        runs[tag] = {"label": label, "tag": tag, "overrides": overrides, "points": points, "reference": results["reference"], "made_from": run_made_from}
        path.write_text(json.dumps(runs[tag], indent=2))
    reference = next(iter(runs.values()))["reference"]
    # By grid membership, not by each saved run's label: one run can be a grid point and an ablation point.
    grid_runs = {label: [runs[sweep_tag(overrides)] for run_label, overrides in grid if run_label == label] for label in SWEEP_KNOBS}
    picks = {label: pick_setting(label_runs, reference["valid_rate"]) for label, label_runs in grid_runs.items()}
    (out / "sweep_picks.json").write_text(json.dumps(picks, indent=2))
    ablation = {overrides["alpha"]: point for run_label, overrides in grid if run_label == "FPO alpha ablation"
                for point in runs[sweep_tag(overrides)]["points"] if point["step"] == cfg.prefer.pref_steps}
    report = sweep_report(picks, ablation, reference, cfg.prefer)
    (out / "sweep.md").write_text(report)
    write_sweep_charts(out, runs, grid_runs, picks)
    print("\n" + report + f"\nsweep: wrote {out / 'sweep_picks.json'}, {out / 'sweep.md'} and frontier.svg, validity.svg, win_rate.svg in {out} | {(time.time() - started) / 60:.1f} min")


def nested(results: dict, path: tuple):
    """results[path[0]][path[1]]..., or NaN where a key is missing."""
    for key in path:
        results = results.get(key, float("nan")) if isinstance(results, dict) else float("nan")
    return results


def pick_setting(runs: list[dict], reference_valid: float) -> dict:
    """The (setting, length) with the highest validation judge score among those whose valid rate is
    at least VALIDITY_FLOOR x the reference's; if none is, the most valid one."""
    candidates = [{"settings": run["overrides"] | {"pref_steps": point["step"]}, "validation": point, "run": run["tag"]} for run in runs for point in run["points"]]
    fluent = [c for c in candidates if c["validation"]["valid_rate"] >= VALIDITY_FLOOR * reference_valid]
    return max(fluent, key=lambda c: c["validation"]["judge_score"]) if fluent else max(candidates, key=lambda c: c["validation"]["valid_rate"])


def sweep_report(picks: dict, ablation: dict, reference: dict, pref: train.PreferenceConfig) -> str:
    """Markdown: each method's pick and its validation numbers; FPO's alpha ablation."""
    lines = [f"Reference on the validation prompts: judge score {reference['judge_score']:.3f}, valid {reference['valid_rate']:.3f}, "
             f"on topic {reference['on_topic_rate']:.3f}, positive {reference['positive_rate']:.3f}.\n",
             "| method | picked setting | steps | judge score | valid | win rate | KL from ref |", "|---|---|---|---|---|---|---|"]
    for label, pick in picks.items():
        setting = ", ".join(f"{key} {value:g}" for key, value in pick["settings"].items() if key not in ("method", "pref_steps"))
        point = pick["validation"]
        lines.append(f"| {label} | {setting} | {pick['settings']['pref_steps']} | {point['judge_score']:.3f} | {point['valid_rate']:.3f} | {point['win_rate']:.3f} | {point['kl_from_reference']:.2f} |")
    lines += ["", f"FPO's alpha ablation: beta {pref.beta:g}, lr {pref.pref_lr:g}, {pref.pref_steps} steps, validation prompts.", "",
              "| alpha | judge score | valid | win rate | KL from ref |", "|---|---|---|---|---|"]
    lines += [f"| {alpha:g} | {p['judge_score']:.3f} | {p['valid_rate']:.3f} | {p['win_rate']:.3f} | {p['kl_from_reference']:.2f} |" for alpha, p in ablation.items()]
    return "\n".join(lines) + "\n"


def write_sweep_charts(out: Path, runs: dict, grid_runs: dict, picks: dict) -> None:
    """frontier.svg: judge score against KL at every point of every grid run; validity.svg and
    win_rate.svg: along the picked setting's run of each method."""
    frontier = {label: [(p["kl_from_reference"], p["judge_score"]) for run in label_runs for p in run["points"]] for label, label_runs in grid_runs.items()}
    (out / "frontier.svg").write_text(svg_chart("Reward-KL frontier (validation prompts, every grid point)", "KL(policy || reference), log scale", "judge score", frontier, lines=False, log_x=True))
    for key, name, title in (("valid_rate", "validity", "Validity"), ("win_rate", "win_rate", "Win rate over the reference")):
        series = {label: [(p["step"], p[key]) for p in runs[pick["run"]]["points"]] for label, pick in picks.items()}
        (out / f"{name}.svg").write_text(svg_chart(f"{title} along training, each method at its pick's setting", "steps", key.replace("_", " "), series, lines=True))


SVG_COLOURS = ("#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def svg_chart(title: str, x_label: str, y_label: str, series: dict[str, list[tuple[float, float]]], lines: bool, log_x: bool = False) -> str:
    """A chart as SVG text: one <g class="series" data-label=...> per series, its points as circles
    (joined by a polyline when `lines`), grid lines with their values, and a legend."""
    width, height, left, right, top, bottom = 640, 400, 70, 170, 40, 50
    scale_x = (lambda x: math.log10(max(x, 1e-3))) if log_x else (lambda x: x)
    xs = [scale_x(x) for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_low, x_high, y_low, y_high = min(xs), max(xs) + 1e-9, min(ys), max(ys) + 1e-9

    def px(x: float) -> float:
        return left + (scale_x(x) - x_low) / (x_high - x_low) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom)

    def text(x, y, content, anchor="start", extra=""):
        return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="12"{extra}>{escape(content)}</text>'

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             '<rect width="100%" height="100%" fill="white"/>', text(width / 2, 20, title, "middle", ' font-weight="bold"'),
             text((left + width - right) / 2, height - 12, x_label, "middle"),
             text(16, (top + height - bottom) / 2, y_label, "middle", f' transform="rotate(-90 16 {(top + height - bottom) / 2})"')]
    x_ticks = [10.0**e for e in range(math.ceil(x_low), math.floor(x_high) + 1)] if log_x else [x_low + i * (x_high - x_low) / 4 for i in range(5)]
    for tick in x_ticks:
        parts += [f'<path d="M{px(tick):.1f},{top} V{height - bottom}" stroke="#ddd"/>', text(px(tick), height - bottom + 16, f"{tick:.3g}", "middle")]
    for tick in (y_low + i * (y_high - y_low) / 4 for i in range(5)):
        parts += [f'<path d="M{left},{py(tick):.1f} H{width - right}" stroke="#ddd"/>', text(left - 6, py(tick) + 4, f"{tick:.3g}", "end")]
    parts.append(f'<path d="M{left},{top} V{height - bottom} H{width - right}" stroke="black" fill="none"/>')
    for i, (label, points) in enumerate(series.items()):
        colour = SVG_COLOURS[i % len(SVG_COLOURS)]
        parts.append(f'<g class="series" data-label="{escape(label)}" fill="{colour}" stroke="{colour}">')
        if lines and points:
            parts.append(f'<polyline fill="none" points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)}"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3"/>' for x, y in points]
        parts += [f'<rect x="{width - right + 12}" y="{top + 18 * i}" width="10" height="10"/>', text(width - right + 28, top + 18 * i + 9, label, extra=' stroke="none"'), "</g>"]
    return "\n".join(parts + ["</svg>"]) + "\n"


# ----------------------------------------------------------------------------------------------
# --compare: each method at its --sweep pick, on the test prompts, over --seeds seeds


def pretrain_if_missing(cfg: train.Config, device) -> None:
    """The GPT and SAE every method starts from: trained here unless --out_dir has them."""
    if not (Path(cfg.run.out_dir) / "gpt.pt").exists():
        train.pretrain(cfg, device)
    if not (Path(cfg.run.out_dir) / "sae.pt").exists():
        train.train_sae_stage(cfg, device)


def compare_rows(out: Path) -> dict[str, dict]:
    """Each row's preference settings: the picks of --sweep if out_dir holds them (FPO's also with
    alpha 0), else COMPARE_ROWS at the default length."""
    path = out / "sweep_picks.json"
    if not path.exists():
        print(f"compare: no {path} (run --sweep first to tune every method alike); using COMPARE_ROWS")
        return COMPARE_ROWS
    picks = {label: pick["settings"] for label, pick in json.loads(path.read_text()).items()}
    print(f"compare: the settings --sweep picked, from {path}")
    return {"FPO": picks["FPO"], "FPO (alpha=0)": picks["FPO"] | {"alpha": 0.0}} | picks


def compare(cfg: train.Config, device) -> None:
    out = Path(cfg.run.out_dir)
    pretrain_if_missing(cfg, device)
    settings = compare_rows(out)
    print(f"\n== compare: {', '.join(settings)} x {cfg.run.seeds} seeds ==")
    rows, started = [], time.time()
    for seed in range(cfg.run.seed, cfg.run.seed + cfg.run.seeds):
        reference_samples = {}
        for label, overrides in settings.items():
            row_cfg, tag = with_method(cfg, overrides), compare_tag(label, seed)
            row_path = out / f"{tag}_results.json"
            if cfg.run.resume and row_path.exists():  # finished before an interruption
                print(f"compare: {label}, seed {seed}: finished earlier ({row_path}); skipped (--resume)")
                rows.append(json.loads(row_path.read_text()))
                continue
            cost = in_child_process(train.train_preference, row_cfg, device, seed, tag)
            results = evaluate(row_cfg, device, seed, tag, reference_samples)
            results.update(label=label, median_step_ms=1000 * cost["median_step_s"])
            row_path.write_text(json.dumps(results, indent=2))
            rows.append(results)
    table = compare_table(rows, list(settings), cfg.run.seeds)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps({"rows": rows, "settings": settings, "preference": dataclasses.asdict(cfg.prefer)}, indent=2))
    print("\n" + table)
    for label in settings:
        print(text_chart(label, out / f"{compare_tag(label, cfg.run.seed)}_log.jsonl"))
    print(f"compare: wrote {out / 'compare.md'} and {out / 'compare.json'} | {(time.time() - started) / 60:.1f} min")


def compare_table(rows: list[dict], labels: list[str], n_seeds: int) -> str:
    """Markdown: one row per method, mean ± standard deviation over seeds; then each baseline's
    paired difference in win rate from FPO with its 95% bootstrap interval over prompts."""
    lines = [f"| method | {' | '.join(TABLE_COLUMNS)} |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for label in labels:
        cells = []
        for path, digits in TABLE_COLUMNS.values():
            values = [float(nested(row, path)) for row in rows if row["label"] == label]
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.{digits}f}{spread}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append(f"\nMean ± standard deviation over {n_seeds} seed(s).\n")
    wins = {label: [row["prompt_wins"] for row in sorted(rows, key=lambda r: r["seed"]) if row["label"] == label and "prompt_wins" in row] for label in labels}
    if wins["FPO"]:
        lines += ["| FPO's win rate minus | difference | 95% interval |", "|---|---|---|"]
        for label in labels[1:]:
            mean, low, high = paired_difference(wins["FPO"], wins[label])
            lines.append(f"| {label} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] |")
        lines.append(f"\nPaired: the same {n_seeds} seed(s) and the same {len(wins['FPO'][0])} test prompts; the interval is a bootstrap over prompts.\n")
    return "\n".join(lines)


def paired_difference(a: list[list[float]], b: list[list[float]], n_resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b, and its 95% bootstrap interval from resampling prompts (the same draw for
    every seed, so each seed's pairing is kept). a, b: per-prompt values, (seeds, prompts)."""
    differences = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # (S, P)
    draws = torch.randint(0, differences.shape[1], (n_resamples, differences.shape[1]), generator=torch.Generator().manual_seed(seed))
    means = differences[:, draws].mean(dim=(0, 2))  # (n_resamples,)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return differences.mean().item(), low, high


def text_chart(label: str, log_path: Path, width: int = 60) -> str:
    """The reward margin and feature drift over training, one row of block characters each: the
    steps are split into at most `width` equal spans, and each character is its span's mean."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    lines = [f"{label}: {len(records)} steps"]
    for key in ("margin", "feature_drift"):
        values = [r[key] for r in records]
        n_spans = min(width, len(values))
        spans = [values[i * len(values) // n_spans : (i + 1) * len(values) // n_spans] for i in range(n_spans)]
        means = [sum(span) / len(span) for span in spans]
        low, high = min(means), max(means)
        bars = "".join(" ▁▂▃▄▅▆▇█"[round(8 * (m - low) / (high - low)) if high > low else 4] for m in means)
        lines.append(f"  {key:<13} {low:>9.4g} {bars} {high:.4g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --bench


def bench(cfg: train.Config, device) -> None:
    """Median training-step time of each method on identical batches, interleaved A B C A B C so
    drift in machine speed hits every method alike; then each method's training-loop memory,
    measured in a fresh process that loads only what that method needs. The GPT size flags pick
    the model (a short --pretrain_steps is enough for timing)."""
    pretrain_if_missing(cfg, device)
    print(f"\n== bench: {cfg.run.bench_steps} interleaved steps per method ==")
    reference, gpt_fingerprint = train.load_gpt(cfg, device)
    reference.eval().requires_grad_(False)
    inputs = train.load_preference_inputs(cfg, reference, gpt_fingerprint, device)
    settings = {label: with_method(cfg, overrides).prefer for label, overrides in COMPARE_ROWS.items()}
    policies = {label: GPT(reference.config).to(device) for label in settings}
    optimizers = {}
    for label, policy in policies.items():
        policy.load_state_dict(reference.state_dict())
        optimizers[label] = torch.optim.AdamW(policy.parameters(), lr=settings[label].pref_lr, weight_decay=0.0)
    n_warmup = 3
    step_ms = {label: [] for label in settings}
    for step in range(n_warmup + cfg.run.bench_steps):
        picks = batch_indices(len(inputs.train_pairs), cfg.prefer.pref_batch_size, cfg.run.seed, step)
        batch = data.pair_batch(inputs.train_pairs, picks, 0, data.eos_id(inputs.enc), device)
        for label, pref in settings.items():
            started = time.perf_counter()
            with autocast(device):
                losses, *_ = train.preference_losses(pref, cfg.sae.sae_layer, policies[label], batch, inputs, reference)
            optimizers[label].zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(policies[label].parameters(), pref.grad_clip)
            optimizers[label].step()
            synchronize(device)
            if step >= n_warmup:
                step_ms[label].append(1000 * (time.perf_counter() - started))
    results = {label: {"median_step_ms": statistics.median(times)} for label, times in step_ms.items()}
    for label, overrides in COMPARE_ROWS.items():
        memory_cfg = with_method(cfg, overrides | {"pref_steps": n_warmup + 2})
        results[label] |= in_child_process(train_and_measure, memory_cfg, device, cfg.run.seed, "bench_" + compare_tag(label, cfg.run.seed))
    ratios = {
        f"FPO/{other} {measure}": results["FPO"][key] / results[other][key]
        for measure, key in (("time", "median_step_ms"), ("loop memory", "loop_memory_mb")) for other in ("SimPO", "DPO", "TDPO-2")
    }
    pre = cfg.pretrain
    print(f"\nGPT {pre.n_layer} x {pre.n_embd}, {sum(p.numel() for p in reference.parameters()):,} parameters; SAE {inputs.sae.d_sae} latents; {device}")
    print(f"| method | median ms/step | loop memory MB ({'max allocated' if device.type == 'cuda' else 'live tensors'}) | peak RSS MB |\n|---|---|---|---|")
    for label, values in results.items():
        print(f"| {label} | {values['median_step_ms']:.1f} | {values['loop_memory_mb']:.1f} | {values['peak_rss_mb']:.0f} |")
    print("\n" + " | ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
    path = Path(cfg.run.out_dir) / "bench.json"
    path.write_text(json.dumps({"device": str(device), "steps": cfg.run.bench_steps, "gpt": dataclasses.asdict(pre), "d_sae": inputs.sae.d_sae,
                                "methods": results, "ratios": ratios}, indent=2))
    print(f"bench: wrote {path}")


# ----------------------------------------------------------------------------------------------
# `python evaluate.py DIR...`: the table of finished `python train.py` runs (the README's per-seed table)

RUN_COLUMNS = {  # column: (results key path, digits)
    "win rate": (("win_rate",), 3), "valid": (("policy", "valid_rate"), 3), "reference valid": (("reference", "valid_rate"), 3),
    "judge score": (("policy", "judge_score"), 3), "reference judge score": (("reference", "judge_score"), 3),
    "reference on topic": (("reference", "on_topic_rate"), 3), "reference positive": (("reference", "positive_rate"), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2), "minutes": (("seconds", "total"), 1),
}


def runs_table(out_dirs: list[str]) -> str:
    """Markdown: one row per run directory (seed and CPU threads from its results.json), then the
    mean ± standard deviation of every column. minutes: the stages that wrote the results.json ran
    (all five for a whole `python train.py`)."""
    runs = [json.loads((Path(out_dir) / "results.json").read_text()) for out_dir in out_dirs]
    for run in runs:
        run.setdefault("seconds", {})["total"] = sum(run.get("seconds", {}).values()) / 60  # minutes
    lines = [f"| run | seed | threads | {' | '.join(RUN_COLUMNS)} |", "|---" * (len(RUN_COLUMNS) + 3) + "|"]
    for out_dir, run in zip(out_dirs, runs):
        cells = [f"{nested(run, path):.{digits}f}" for path, digits in RUN_COLUMNS.values()]
        lines.append(f"| {Path(out_dir).name} | {run['seed']} | {run['cpu_threads']} | {' | '.join(cells)} |")
    spread = [f"{statistics.mean(values):.{d}f} ± {statistics.stdev(values) if len(values) > 1 else 0:.{d}f}"
              for values, d in (([nested(run, path) for run in runs], digits) for path, digits in RUN_COLUMNS.values())]
    return "\n".join(lines + [f"| mean ± std | | | {' | '.join(spread)} |"]) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python evaluate.py OUT_DIR [OUT_DIR ...]  (each holding a results.json)")
    print(runs_table(sys.argv[1:]), end="")
