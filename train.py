"""The whole FPO pipeline, one stage after another (`python train.py` runs all five):

    1. pretrain  a small GPT on the corpus                         -> gpt.pt
    2. sae       a TopK SAE on the GPT's residual stream           -> sae.pt, sae_metrics.json
    3. cache     the frozen reference's terms, once, offline       -> reference_cache.pt
    4. prefer    FPO (or a baseline) on the preference pairs       -> policy.pt, policy_log.jsonl
    5. eval      judge, KL, entropy and reward accuracy, held out  -> results.json

`python train.py --stage sae` (or cache, prefer, eval) runs one stage, reading the earlier
stages' outputs from --out_dir. Any config field is a flag (`--beta 2.0`; config.py,
`python train.py --help`). The loss is fpo.py's; the metrics are evaluate.py's; what a stage
reads is loaded by loading.py; devices, checkpoints, resume and Ctrl-C live in runtime.py. The
experiments/ package, which nothing here imports, tunes and compares the methods.
"""

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import data
import evaluate
import fpo
from config import (
    ONLINE_REFERENCE, STAGES, Config, PreferenceConfig, PretrainConfig, SAEConfig, latent_weights,
    parse_args, run_command, settings_section, stage_settings,
)
from loading import (
    check_inputs_and_outputs, load_gpt, load_pairs, load_policy, load_texts, load_trained_sae,
    save_policy, tokenize,
)
from model import GPT, GPTConfig
from runtime import (
    Interrupted, UsageError, autocast, batch_indices, changed_inputs, check_finite,
    check_finite_model, fingerprint, in_float32, learning_rate, load_checkpoint, log_line,
    out_dir_lock, pick_device, precision, read_json, resume_training, save_checkpoint,
    save_resume, stages_to_run, stop_at_step_boundary, synchronize, training_state, write_json,
    write_text,
)
from sae import eval_mode, evaluate_sae, harvest_activations, train_sae


def main(argv: list[str]) -> None:
    """Parse and check every flag, then run the stages of --stage in order."""
    cfg = parse_args(argv, description=__doc__.split("\n\n")[0])
    device = start_run(cfg)
    with out_dir_lock(cfg.run.out_dir):
        run_stages(cfg, device)


def start_run(cfg: Config) -> torch.device:
    """What every command does first: pick the device and the CPU threads, say so, and check the
    data and --out_dir before any work (the experiments start the same way)."""
    device = pick_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
    print(f"device: {device} ({torch.get_num_threads()} CPU threads)\n{cfg.run}")
    check_inputs_and_outputs(cfg)
    return device


def run_stages(cfg: Config, device) -> None:
    """The stages of --stage in order, then the time each took."""
    out = Path(cfg.run.out_dir)
    timings = {}
    started = time.time()
    for stage in stages_to_run(cfg.run.stage, STAGES, cfg.run.out_dir, cfg.run.resume):
        stage_started = time.time()
        if stage == "pretrain":
            pretrain(cfg, device)
        elif stage == "sae":
            train_sae_stage(cfg, device)
        elif stage == "cache":
            load_preference_inputs(cfg, *load_gpt(cfg, device), device, rebuild=True)
        elif stage == "prefer":
            train_preference(cfg, device, seed=cfg.run.seed)
        else:
            eval_stage(cfg, device)
        timings[stage] = time.time() - stage_started
    if "eval" in timings:  # the run's cost, next to its results
        path = out / "results.json"
        write_json(path, read_json(path, "rerun `--stage eval`") | {"seconds": timings})
    per_stage = ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings.items())
    print(f"time per stage: {per_stage}; total {time.time() - started:.0f}s")


# ----------------------------------------------------------------------------------------------
# Stage 1: pretrain the GPT on the corpus.


def pretrain(cfg: Config, device) -> None:
    pretrain_cfg = cfg.pretrain
    print(f"\n== pretrain ==\n{pretrain_cfg}")
    enc = data.load_tokenizer()
    tokens = data.corpus_token_stream(load_texts(cfg), enc)
    print(f"pretrain: {len(tokens):,} tokens, vocabulary {enc.n_vocab}")
    config = GPTConfig(
        vocab_size=enc.n_vocab,
        block_size=pretrain_cfg.block_size,
        n_layer=pretrain_cfg.n_layer,
        n_head=pretrain_cfg.n_head,
        n_embd=pretrain_cfg.n_embd,
    )
    torch.manual_seed(cfg.run.seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=pretrain_cfg.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95)
    )
    out = Path(cfg.run.out_dir) / "gpt.pt"
    resume_path = Path(cfg.run.out_dir) / "gpt.resume.pt"
    settings = stage_settings(cfg, "pretrain")
    start_step = 0
    if cfg.run.resume:
        start_step, _ = resume_training(resume_path, "pretrain", settings, model, optimizer)
    started = time.time()
    with stop_at_step_boundary() as stop:
        for step in range(start_step, pretrain_cfg.pretrain_steps):
            if stop.is_set():
                save_resume(resume_path, settings, step, training_state(model, optimizer))
                raise Interrupted("pretrain", step, saved_to=resume_path)
            # learning rate: 100 warm-up steps, then cosine decay
            lr = learning_rate(
                step, pretrain_cfg.pretrain_lr, 100, pretrain_cfg.pretrain_steps, "cosine"
            )
            set_learning_rate(optimizer, lr)
            # batch: random windows of the token stream; forward and loss
            starts = batch_indices(
                len(tokens) - pretrain_cfg.block_size,
                pretrain_cfg.pretrain_batch_size,
                cfg.run.seed,
                step,
            )
            x, y = (t.to(device) for t in data.lm_windows(tokens, starts, pretrain_cfg.block_size))
            with autocast(device):
                logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            # stop on a non-finite loss; save the last good state every log_every steps
            check_finite(loss, "pretrain", step, resume_path, "--pretrain_lr too high")
            if step % cfg.run.log_every == 0:
                save_resume(resume_path, settings, step, training_state(model, optimizer))
            # update
            update(model, optimizer, loss, grad_clip=1.0)
            # log
            if step % cfg.run.log_every == 0 or step == pretrain_cfg.pretrain_steps - 1:
                elapsed = max(time.time() - started, 1e-9)
                tokens_per_s = int((step + 1 - start_step) * x.numel() / elapsed)
                steps = pretrain_cfg.pretrain_steps
                line = log_line("pretrain", step, steps, started, loss=loss.item(),
                                tok_per_s=tokens_per_s)
                print(line, flush=True)
    check_finite_model(model, "pretrain", "--pretrain_lr too high", probe=x)
    save_checkpoint(
        out, "gpt", settings, {}, model_config=asdict(config), state_dict=model.state_dict()
    )
    resume_path.unlink(missing_ok=True)
    print(f"pretrain: saved {out}")


# ----------------------------------------------------------------------------------------------
# Stage 2: train the SAE on the GPT's residual stream.


def train_sae_stage(cfg: Config, device) -> None:
    sae_cfg = cfg.sae
    block_size = cfg.pretrain.block_size
    print(f"\n== sae ==\n{sae_cfg}")
    enc = data.load_tokenizer()
    model, gpt_fingerprint = load_gpt(cfg, device)
    tokens = data.corpus_token_stream(load_texts(cfg), enc)
    # The last sae_eval_tokens of the corpus are held out for the metrics.
    n_eval = min(sae_cfg.sae_eval_tokens, len(tokens) // 5)
    train_chunks = data.contiguous_chunks(tokens[:-n_eval], block_size, sae_cfg.sae_tokens)
    eval_chunks = data.contiguous_chunks(tokens[-n_eval:], block_size, n_eval)
    activations = harvest_activations(
        model,
        data.chunk_batches(train_chunks, 64, device),
        sae_cfg.sae_layer,
        sae_cfg.sae_tokens,
    )
    out = Path(cfg.run.out_dir)
    try:
        sae = train_sae(
            activations,
            sae_cfg.d_sae,
            sae_cfg.sae_k,
            steps=sae_cfg.sae_steps,
            batch_size=sae_cfg.sae_batch_size,
            lr=sae_cfg.sae_lr,
            seed=cfg.run.seed,
            log_every=cfg.run.log_every * 5,
            resume_path=out / "sae.resume.pt",
            settings=stage_settings(cfg, "sae"),
            resume=cfg.run.resume,
        )
    except FloatingPointError as error:
        raise UsageError(
            f"sae: {error}; training stopped; likely cause: --sae_lr too high; nothing was saved"
        ) from None
    sae = sae.to(device)
    metrics = evaluate_sae(
        model,
        sae,
        data.chunk_batches(eval_chunks, 64, device),
        sae_cfg.sae_layer,
        train_activations=activations,
    )
    check_finite_model(sae, "sae", "--sae_lr too high", probe=activations[:1024].to(device))
    not_finite = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not_finite:
        raise UsageError(
            f"sae: the metrics {', '.join(not_finite)} are not finite; likely cause: --sae_lr too "
            "high, or a GPT whose residual stream is not finite; nothing was saved"
        )
    made_from = {"GPT": gpt_fingerprint, "layer": sae_cfg.sae_layer % cfg.pretrain.n_layer}
    settings = stage_settings(cfg, "sae")
    save_checkpoint(out / "sae.pt", "sae", settings, made_from, **sae.checkpoint(), metrics=metrics)
    write_json(out / "sae_metrics.json", metrics)
    (out / "sae.resume.pt").unlink(missing_ok=True)
    print(f"sae: saved {out / 'sae.pt'} and {out / 'sae_metrics.json'}")


# ----------------------------------------------------------------------------------------------
# Stage 3: the offline reference cache: one reference pass, then no reference model at all.


@dataclass
class PreferenceInputs:
    """What preference training and evaluation read and never change."""

    enc: object  # the tokenizer (tiktoken.Encoding)
    sae: torch.nn.Module  # frozen: eval(), no gradients
    train_pairs: list  # data.TokenizedPair; cache rows 0..2n-1 (chosen, then rejected)
    test_pairs: list  # data.TokenizedPair; the cache rows after the training pairs'
    cache: dict  # fpo.build_reference_cache's dict: avg_logp_ref and pooled_ref of every response
    made_from: dict  # fingerprints of the reference GPT and the SAE


CACHE_FORMAT = 2  # 2: pooled at the positions that generate the response tokens; sums stored


def load_preference_inputs(
    cfg: Config,
    reference: GPT,
    gpt_fingerprint: str,
    device,
    rebuild: bool = False,
) -> PreferenceInputs:
    """The SAE, the tokenized pairs, and the reference cache: built if `rebuild`, or if its
    fingerprint doesn't match the data, the SAE or `reference` (the pretrained weights the policy
    starts from)."""
    enc = data.load_tokenizer()
    sae, sae_fingerprint = load_trained_sae(cfg, gpt_fingerprint, device)
    train_pairs, test_pairs = load_pairs(cfg)
    block_size = cfg.pretrain.block_size
    inputs = PreferenceInputs(
        enc,
        sae,
        tokenize(train_pairs, enc, block_size, "training"),
        tokenize(test_pairs, enc, block_size, "held-out"),
        cache={},
        made_from={"reference model": gpt_fingerprint, "SAE": sae_fingerprint},
    )
    every_pair = inputs.train_pairs + inputs.test_pairs
    token_ids = json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in every_pair])
    n_train = {"n_train_pairs": len(inputs.train_pairs)}
    expected = inputs.made_from | {
        "dataset or tokenizer": fingerprint(token_ids, n_train),
        "precision": precision(device),
        "cache format": CACHE_FORMAT,
    }
    path = Path(cfg.run.out_dir) / "reference_cache.pt"
    if path.exists() and not rebuild:
        cache = load_checkpoint(path, "reference_cache", "")
        changed = changed_inputs(cache, expected)
        if not changed:
            inputs.cache = cache
            return inputs
        print(f"cache: {path} is stale: it was built from another {' and '.join(changed)}; "
              "rebuilding")
    elif not rebuild:
        print(f"cache: {path} not found; building it")
    inputs.cache = build_cache(cfg, reference, inputs, expected, device)
    return inputs


def build_cache(
    cfg: Config,
    reference: GPT,
    inputs: PreferenceInputs,
    made_from: dict,
    device,
) -> dict:
    """Build and save the cache of every training and held-out response; training pairs first."""
    print("\n== cache ==")
    everything = inputs.train_pairs + inputs.test_pairs
    started = time.time()

    def batches():
        eos = data.eos_id(inputs.enc)
        last_batch = (len(everything) - 1) // 64
        for batch_number, batch in enumerate(data.every_pair(everything, 64, 0, eos, device)):
            yield batch
            if batch_number % 20 == 0 or batch_number == last_batch:
                done = min(64 * (batch_number + 1), len(everything))
                print(f"cache: {done}/{len(everything)} pairs | {time.time() - started:.1f}s",
                      flush=True)

    with eval_mode(reference), autocast(device):
        cache = fpo.build_reference_cache(
            lambda ids: reference(ids, hidden_layer=cfg.sae.sae_layer),
            lambda hidden: in_float32(inputs.sae.encode, hidden),
            batches(),
            n_rows=2 * len(everything),
            d_sae=inputs.sae.d_sae,
        )
    path = Path(cfg.run.out_dir) / "reference_cache.pt"
    save_checkpoint(
        path,
        "reference_cache",
        {"sae_layer": cfg.sae.sae_layer},
        made_from,
        **cache,
        n_train_pairs=len(inputs.train_pairs),
    )
    n_features = cache["feature_values"].numel()
    print(f"cache: saved {path} ({n_features:,} non-zero pooled features "
          f"for {2 * len(everything)} responses)")
    return cache


# ----------------------------------------------------------------------------------------------
# Stage 4: preference training. One loop for every method; the losses are fpo.py's functions.
# A batch is 2B rows: B chosen responses, then their B rejected ones, each row the prompt and one
# response, padded on the right; rows holds each response's row in the reference cache.


DIVERGED = "--pref_lr or --beta too high, or --beta/--alpha not finite"  # a non-finite loss's cause


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,), detached
    rejected_rewards: torch.Tensor  # (B,), detached
    feature_mses: torch.Tensor | None  # D(y) of all 2B responses (FPO: part of its loss), or None
    hidden: torch.Tensor  # the policy's residual stream read by the SAE, (2B, T, C), detached


def preference_losses(
    pref_cfg: PreferenceConfig,
    sae_layer: int,
    policy: GPT,
    batch,
    inputs: PreferenceInputs,
    reference: GPT | None,
) -> PreferenceLoss:
    """One concatenated chosen+rejected forward and the method's loss.

    batch: (cache rows (2B,), input_ids (2B, T), response_mask (2B, T)), chosen rows first.
    reference: the frozen GPT for the methods that run it every step (ONLINE_REFERENCE).
    """
    rows, input_ids, mask = batch
    B = len(rows) // 2
    logits, hidden = policy(input_ids, hidden_layer=sae_layer)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)  # (2B,), (2B,)
    avg_logps = sum_logps / n_tokens  # avg_logp_theta(y)
    cached_rows = rows.cpu()
    reference_avg_logps = inputs.cache["avg_logps"][cached_rows].to(avg_logps.device)
    method = pref_cfg.method
    if method == "fpo":  # offline reference: avg_logp_ref and pooled_ref come from the cache
        feature_mses = batch_feature_mse(pref_cfg, hidden, batch, inputs)
        losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
            avg_logps[:B], avg_logps[B:],
            reference_avg_logps[:B], reference_avg_logps[B:],
            feature_mses[:B], feature_mses[B:],
            beta=pref_cfg.beta, alpha=pref_cfg.alpha, stop_gradient=pref_cfg.fpo_stop_grad,
        )
        return PreferenceLoss(
            losses, chosen_rewards, rejected_rewards, feature_mses.detach(), hidden.detach()
        )
    if method == "simpo":  # no reference at all
        losses, chosen_rewards, rejected_rewards = fpo.simpo_loss(
            avg_logps[:B], avg_logps[B:], beta=pref_cfg.beta, gamma=pref_cfg.gamma
        )
        return PreferenceLoss(losses, chosen_rewards, rejected_rewards, None, hidden.detach())
    # The reference's summed log-probs: from FPO's cache, or online (with its logits for SeqKL).
    if method == "dpo_offline":
        reference_logps = inputs.cache["sum_logps"][cached_rows].to(sum_logps.device)
    elif method in ONLINE_REFERENCE:  # fpo_kl, dpo, tdpo1, tdpo2: the reference runs every step
        with torch.no_grad():
            reference_logits, _ = reference(input_ids)
        reference_logps, _ = fpo.sequence_logps(reference_logits, input_ids, mask)
    else:
        raise ValueError(f"unknown method {method!r}")
    if method in ("dpo", "dpo_offline"):
        losses, chosen_rewards, rejected_rewards = fpo.dpo_loss(
            sum_logps[:B], sum_logps[B:],
            reference_logps[:B], reference_logps[B:],
            beta=pref_cfg.beta,
        )
        return PreferenceLoss(losses, chosen_rewards, rejected_rewards, None, hidden.detach())
    seq_kl = fpo.sequence_kl(  # SeqKL(y) = sum_t KL(pi_ref || pi_theta), (2B,)
        p_logits=reference_logits, q_logits=logits, response_mask=mask
    )
    if method == "fpo_kl":  # FPO's loss with SeqKL(y) in place of D(y)
        losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
            avg_logps[:B], avg_logps[B:],
            reference_avg_logps[:B], reference_avg_logps[B:],
            seq_kl[:B], seq_kl[B:],
            beta=pref_cfg.beta, alpha=pref_cfg.alpha, stop_gradient=pref_cfg.fpo_stop_grad,
        )
    else:
        losses, chosen_rewards, rejected_rewards = fpo.tdpo_loss(
            sum_logps[:B], sum_logps[B:],
            reference_logps[:B], reference_logps[B:],
            seq_kl[:B], seq_kl[B:],
            beta=pref_cfg.beta, alpha=pref_cfg.alpha, version=1 if method == "tdpo1" else 2,
        )
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards, None, hidden.detach())


def batch_feature_mse(pref_cfg, hidden: torch.Tensor, batch, inputs) -> torch.Tensor:
    """D(y) of every response in a batch, from the policy's residual stream `hidden` (2B, T, C)
    and the offline cache (fpo.cached_feature_mse). Shape: (2B,)."""
    rows, _, mask = batch
    return fpo.cached_feature_mse(
        hidden, mask, inputs.sae.encode_topk, inputs.cache, rows, pref_cfg.fpo_k,
        weights=torch.tensor(latent_weights(pref_cfg.fpo_latent_weights, inputs.sae.d_sae)),
    )


@torch.no_grad()
def measured_feature_mse(pref_cfg, result: PreferenceLoss, batch, inputs) -> torch.Tensor:
    """D(y) of every response in the batch, for every method: FPO's from its loss; the other
    methods', measured on the residual stream of the same forward (no second one). Shape: (2B,)."""
    if result.feature_mses is not None:
        return result.feature_mses
    return batch_feature_mse(pref_cfg, result.hidden, batch, inputs)


def train_preference(cfg: Config, device, seed: int, tag: str = "policy") -> dict:
    """Train one policy with cfg.prefer.method; save it as out_dir/<tag>.pt with a per-step JSONL
    log, out_dir/<tag>_log.jsonl. `seed` fixes the batch order; the data and the starting weights
    are the same for every seed. Returns the median step time in seconds."""
    pref_cfg = cfg.prefer
    print(f"\n== prefer: {pref_cfg.method} ==\n{pref_cfg}")
    policy, inputs, reference = preference_models(cfg, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pref_cfg.pref_lr, weight_decay=0.0)
    out = Path(cfg.run.out_dir)
    resume_path = out / f"{tag}.resume.pt"
    log_path = out / f"{tag}_log.jsonl"
    settings = stage_settings(cfg, "prefer", seed)
    start_step, records = resume_preference(cfg, resume_path, log_path, settings, policy, optimizer)
    eos = data.eos_id(inputs.enc)
    steps = pref_cfg.pref_steps
    policy.train()
    started = time.time()
    with stop_at_step_boundary() as stop:
        for step in range(start_step, steps):
            if stop.is_set():  # Ctrl-C: save, and say how to continue
                write_jsonl(log_path, records)
                save_resume(resume_path, settings, step, training_state(policy, optimizer))
                raise Interrupted("prefer", step, saved_to=resume_path)
            step_started = time.perf_counter()
            # batch: B training pairs drawn by (seed, step); chosen rows, then rejected rows
            picks = batch_indices(len(inputs.train_pairs), pref_cfg.pref_batch_size, seed, step)
            batch = data.pair_batch(
                inputs.train_pairs, picks, row_offset=0, eos_id=eos, device=device
            )
            # learning rate (linear warm-up, then constant), forward and loss
            lr = learning_rate(step, pref_cfg.pref_lr, pref_cfg.warmup_steps, steps, "constant")
            set_learning_rate(optimizer, lr)
            with autocast(device):
                result = preference_losses(
                    pref_cfg, cfg.sae.sae_layer, policy, batch, inputs, reference
                )
            loss = result.losses.mean()
            # stop on a non-finite loss; save the last good state every log_every steps
            check_finite(loss, "prefer", step, resume_path, DIVERGED)
            if step % cfg.run.log_every == 0:
                save_resume(resume_path, settings, step, training_state(policy, optimizer))
            # update
            update(policy, optimizer, loss, pref_cfg.grad_clip)
            synchronize(device)
            # log: every step to the JSONL file, every log_every-th to the terminal as well
            ms_per_step = 1000 * (time.perf_counter() - step_started)
            records.append(step_record(cfg, step, loss, result, ms_per_step, batch, inputs))
            if step % cfg.run.log_every == 0 or step == steps - 1:
                write_jsonl(log_path, records)
                shown = {key: value for key, value in records[-1].items() if key != "step"}
                print(log_line("prefer", step, steps, started, **shown), flush=True)
    check_finite_model(policy, "prefer", "--pref_lr or --beta too high", probe=batch[1])
    save_policy(out / f"{tag}.pt", settings, inputs.made_from, policy)
    resume_path.unlink(missing_ok=True)
    print(f"prefer: saved {out / f'{tag}.pt'} and {log_path}")
    step_ms = [record["ms_per_step"] for record in records] or [float("nan")]
    return {"median_step_s": statistics.median(step_ms) / 1000}


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def update(model: torch.nn.Module, optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, clip the gradient norm, step: the update of every GPT training stage."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def step_record(cfg: Config, step: int, loss, result: PreferenceLoss, ms_per_step: float,
                batch, inputs: PreferenceInputs) -> dict:
    """A training step's log record: the same keys in the JSONL log and on the terminal."""
    # D(y) at the weights that computed this step's loss (other methods: outside the timing)
    feature_mses = measured_feature_mse(cfg.prefer, result, batch, inputs)
    return {
        "step": step,
        "loss": loss.item(),
        "margin": (result.chosen_rewards - result.rejected_rewards).mean().item(),
        "accuracy": (result.chosen_rewards > result.rejected_rewards).float().mean().item(),
        "feature_mse": feature_mses.mean().item(),
        "ms_per_step": ms_per_step,
    }


def preference_models(cfg: Config, device) -> tuple[GPT, PreferenceInputs, GPT | None]:
    """The policy (a copy of the pretrained GPT), the frozen inputs, and the frozen reference GPT
    for the methods that run it every step (None for the others: FPO's reference is its cache)."""
    policy, gpt_fingerprint = load_gpt(cfg, device)
    inputs = load_preference_inputs(cfg, policy, gpt_fingerprint, device)
    reference = None
    if cfg.prefer.method in ONLINE_REFERENCE:
        reference = load_gpt(cfg, device)[0].eval().requires_grad_(False)
    return policy, inputs, reference


def resume_preference(cfg: Config, resume_path: Path, log_path: Path, settings: dict, policy,
                      optimizer) -> tuple[int, list[dict]]:
    """With --resume, the interrupted run's weights, optimizer and log records before its step;
    otherwise step 0 and no records."""
    if not cfg.run.resume:
        return 0, []
    start_step, _ = resume_training(resume_path, "prefer", settings, policy, optimizer)
    if not start_step or not log_path.exists():
        return start_step, []
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    return start_step, [record for record in logged if record["step"] < start_step]


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(record) + "\n" for record in records))


# ----------------------------------------------------------------------------------------------
# Stage 5: evaluation on held-out pairs and prompts (the metrics are evaluate.py's).


@torch.no_grad()
def held_out_accuracy(
    pref_cfg: PreferenceConfig,
    sae_layer: int,
    policy: GPT,
    reference: GPT,
    inputs: PreferenceInputs,
    device,
) -> dict:
    """On the held-out pairs (the cache rows after the training pairs'): mean D(y), reward
    accuracy with the method's own reward, and with the implicit DPO reward log pi(y) -
    log pi_ref(y) (summed log-probs), one measure for every method."""
    accuracies, implicit_accuracies, feature_mses = [], [], []
    eos = data.eos_id(inputs.enc)
    row_offset = len(inputs.train_pairs)
    for batch in data.every_pair(inputs.test_pairs, 64, row_offset, eos, device):
        rows, input_ids, mask = batch
        B = len(rows) // 2
        with autocast(device):
            result = preference_losses(pref_cfg, sae_layer, policy, batch, inputs, reference)
            feature_mses.append(measured_feature_mse(pref_cfg, result, batch, inputs))
            logits, _ = policy(input_ids)
            reference_logps = inputs.cache["sum_logps"][rows.cpu()].to(device)
            implicit_reward = fpo.sequence_logps(logits, input_ids, mask)[0] - reference_logps
        accuracies.append((result.chosen_rewards > result.rejected_rewards).float())
        implicit_accuracies.append((implicit_reward[:B] > implicit_reward[B:]).float())
    return {
        "feature_mse": torch.cat(feature_mses).mean().item(),
        "reward_accuracy": torch.cat(accuracies).mean().item(),  # with the method's own reward
        "implicit_reward_accuracy": torch.cat(implicit_accuracies).mean().item(),
    }


def held_out_prompts(cfg: Config, inputs: PreferenceInputs) -> tuple[list[str], bool]:
    """The prompts policy and reference answer, and whether the judge can score them: the toy
    world's --eval_split prompts, or the prompts of the user's held-out pairs (the judge knows
    only the toy world)."""
    if cfg.run.preference_file:
        return [inputs.enc.decode(pair.prompt_ids) for pair in inputs.test_pairs], False
    return evaluate.eval_prompt_texts(cfg.eval, seed=cfg.run.seed), True


def evaluate_policy(
    cfg: Config,
    device,
    seed: int,
    tag: str = "policy",
    reference_samples: dict | None = None,
) -> dict:
    """Everything results.json holds for out_dir/<tag>.pt: held_out_accuracy, then the judge's
    comparison with the reference on held-out prompts, and the settings it all was made with.
    The policy's own training settings (saved in <tag>.pt) decide its loss terms. The reference's
    samples depend only on the seed: pass one dict to several calls to sample them once."""
    print(f"\n== eval: {tag} ==")
    reference, gpt_fingerprint = load_gpt(cfg, device)
    reference.eval().requires_grad_(False)
    inputs = load_preference_inputs(cfg, reference, gpt_fingerprint, device)
    policy, trained_with = load_policy(cfg, tag, reference, inputs.made_from, device)
    trained_cfg = settings_section(PreferenceConfig, trained_with)
    results = {"method": trained_cfg.method, "seed": seed}
    results |= held_out_accuracy(trained_cfg, cfg.sae.sae_layer, policy, reference, inputs, device)
    prompt_texts, judged = held_out_prompts(cfg, inputs)
    results |= evaluate.judge_against_reference(
        policy, reference, prompt_texts, judged, inputs.enc, cfg.eval, seed, device,
        reference_samples,
    )
    results["trained_with"] = trained_with
    results["cpu_threads"] = torch.get_num_threads()
    # Every config section of this command, but the settings gpt.pt, sae.pt and the policy were
    # made with: `--resume` skips finished stages, whatever their flags say now.
    out = Path(cfg.run.out_dir)
    gpt_settings = load_checkpoint(out / "gpt.pt", "gpt", "")["config"]
    sae_settings = load_checkpoint(out / "sae.pt", "sae", "")["config"]
    results["config"] = {type(section).__name__: asdict(section) for section in vars(cfg).values()}
    results["config"] |= {
        "PretrainConfig": asdict(settings_section(PretrainConfig, gpt_settings)),
        "SAEConfig": asdict(settings_section(SAEConfig, sae_settings)),
        "PreferenceConfig": asdict(trained_cfg),
    }
    return results


def eval_stage(cfg: Config, device) -> None:
    """evaluate_policy() the policy; write results.json and print a summary."""
    results = evaluate_policy(cfg, device, seed=cfg.run.seed)
    path = Path(cfg.run.out_dir) / "results.json"
    write_json(path, results)
    print(evaluate.summary_text(results, path))


if __name__ == "__main__":
    run_command(main)
