"""The whole FPO pipeline, one stage after another (`python train.py` runs all five):

    1. pretrain  a small GPT on the corpus                         -> gpt.pt
    2. sae       a TopK SAE on the GPT's residual stream           -> sae.pt, sae_metrics.json
    3. cache     the frozen reference's terms, once, offline       -> reference_cache.pt
    4. prefer    FPO (or a baseline) on the preference pairs       -> policy.pt, policy_log.jsonl,
                                                                      policy_training.svg
    5. eval      judge, KL, entropy and reward accuracy, held out  -> results.json

`python train.py --stage sae` (or cache, prefer, eval, features) runs one stage, reading the
earlier stages' outputs from --out_dir. Any config field is a flag (`--beta 2.0`; config.py,
`python train.py --help`). The loss is fpo.py's; the metrics are evaluate.py's; devices,
checkpoints, resume and Ctrl-C live in runtime.py. experiments.py tunes and compares the methods.
"""

import json
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import data
import evaluate
import fpo
import report
from config import (
    ONLINE_REFERENCE, STAGES, Config, PreferenceConfig, PretrainConfig, SAEConfig, latent_list,
    parse_args, run_command, settings_section, stage_settings,
)
from model import GPT, GPTConfig
from runtime import (
    Interrupted, UsageError, autocast, batch_indices, changed_inputs, check_finite,
    check_finite_model, check_made_from, in_float32, learning_rate, load_checkpoint, load_resume,
    log_line, out_dir_lock, pick_device, precision, read_json, restore, resume_training,
    save_checkpoint, save_resume, stages_to_run, stop_at_step_boundary, synchronize,
    training_state, write_json, write_text,
)
from sae import (
    eval_mode, evaluate_sae, harvest_activations, load_sae, top_activating_contexts, train_sae,
)


def main(argv: list[str]) -> None:
    """Parse and check every flag, then run the stages of --stage in order."""
    cfg = parse_args(argv, description=__doc__.split("\n\n")[0])
    experiments = ("ablation", "bench", "bound", "compare", "control", "head_to_head", "sweep")
    for experiment in experiments:
        if getattr(cfg.run, experiment):
            raise UsageError(
                f"--{experiment} is an experiment: run `python experiments.py --{experiment}` "
                "with the same flags"
            )
    device = start_run(cfg)
    with out_dir_lock(cfg.run.out_dir):
        run_stages(cfg, device)


def start_run(cfg: Config) -> torch.device:
    """What every command does first: pick the device and the CPU threads, say so, and check the
    data and --out_dir before any work (experiments.py starts the same way)."""
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
            chart = report.training_chart(out / "policy_log.jsonl", "Preference training")
            write_text(out / "policy_training.svg", chart)
        elif stage == "eval":
            eval_stage(cfg, device)
        else:
            feature_report(cfg, device)
        timings[stage] = time.time() - stage_started
    if "eval" in timings:  # the run's cost, next to its results
        path = out / "results.json"
        write_json(path, read_json(path, "rerun `--stage eval`") | {"seconds": timings})
    per_stage = ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings.items())
    print(f"time per stage: {per_stage}; total {time.time() - started:.0f}s")


def check_inputs_and_outputs(cfg: Config) -> None:
    """Read the corpus and the pairs (the toy world's or the user's files) and try --out_dir once
    at start-up, so bad data, a data-dependent limit or an unwritable directory stops the run
    before any training."""
    enc = data.load_tokenizer()
    block_size = cfg.pretrain.block_size
    n_tokens = len(data.corpus_token_stream(load_texts(cfg), enc))
    if n_tokens < 5 * block_size:  # pretraining windows, and the SAE's held-out fifth
        corpus = cfg.run.corpus_file or f"the toy corpus (--n_docs {cfg.pretrain.n_docs})"
        raise data.DataError(
            corpus,
            line=None,
            problem=f"too short: {n_tokens} tokens, at least {5 * block_size} "
            f"(5 x --block_size {block_size}) are needed",
        )
    train_pairs, test_pairs = load_pairs(cfg)
    tokenize(train_pairs, enc, block_size, "training")
    tokenize(test_pairs, enc, block_size, "held-out")
    probe = Path(cfg.run.out_dir) / ".write_test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"--out_dir {cfg.run.out_dir!r} cannot be written to ({error.strerror})"
        ) from None


# ----------------------------------------------------------------------------------------------
# Loading each stage's inputs, each in exactly one place (devices, checkpoints: runtime.py).


def load_texts(cfg: Config) -> list[str]:
    if cfg.run.corpus_file:
        return data.load_corpus(cfg.run.corpus_file)
    return data.make_corpus(cfg.pretrain.n_docs, seed=cfg.run.seed)


def load_pairs(cfg: Config):
    """(train pairs, held-out pairs): the toy world's, or the user's file split."""
    if cfg.run.preference_file:
        return data.split_preference_file(
            cfg.run.preference_file, cfg.run.skip_bad_rows, cfg.prefer.n_test_pairs
        )
    train_pairs = data.make_preference_pairs(cfg.prefer.n_pairs, seed=cfg.run.seed, split="train")
    test_pairs = data.make_preference_pairs(
        cfg.prefer.n_test_pairs, seed=cfg.run.seed, split="test"
    )
    return train_pairs, test_pairs


def tokenize(pairs, enc, block_size: int, what: str):
    tokenized, dropped = data.tokenize_pairs(pairs, enc, block_size)
    if dropped["no room"]:
        print(
            f"data: dropped {dropped['no room']} {what} pairs whose response would not fit "
            f"the {block_size}-token context"
        )
    if dropped["identical"]:
        print(
            f"data: dropped {dropped['identical']} {what} pairs whose chosen and rejected "
            f"responses are the same tokens once cut to the {block_size}-token context"
        )
    if not tokenized:
        raise UsageError(f"no {what} pairs left after truncation to {block_size} tokens")
    return tokenized


def load_gpt(cfg: Config, device) -> tuple[GPT, str]:
    """The pretrained GPT, checked against this run's model settings, and its fingerprint."""
    path = Path(cfg.run.out_dir) / "gpt.pt"
    ckpt = load_checkpoint(path, "gpt", "run `python train.py --stage pretrain` first")
    # A new tokenizer changes the vocabulary.
    asked_config = asdict(cfg.pretrain) | {"vocab_size": data.load_tokenizer().n_vocab}
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        saved = ckpt["model_config"][name]
        asked = asked_config[name]
        if saved != asked:
            raise UsageError(
                f"{path} was trained with {name}={saved}, but this run asks for {name}={asked}: "
                "rerun `--stage pretrain` with these settings, or drop the override"
            )
    model = restore(path, "rerun `--stage pretrain`", lambda: gpt_from(ckpt))
    # The fingerprint is of the weights themselves, so no edit escapes it.
    return model.to(device), fpo.fingerprint(ckpt["state_dict"])


def gpt_from(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model


def load_trained_sae(cfg: Config, gpt_fingerprint: str, device) -> tuple[torch.nn.Module, str]:
    """The frozen SAE, refused unless it was trained on this GPT's residual stream at this layer."""
    path = Path(cfg.run.out_dir) / "sae.pt"
    ckpt = load_checkpoint(path, "sae", "run `python train.py --stage sae` first")
    expected = {"GPT": gpt_fingerprint, "layer": cfg.sae.sae_layer % cfg.pretrain.n_layer}
    check_made_from(path, ckpt, expected, "rerun `--stage sae`")
    sae = restore(path, "rerun `--stage sae`", lambda: load_sae(ckpt))
    return sae.to(device).eval().requires_grad_(False), fpo.fingerprint(ckpt["state_dict"])


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
        start_step = resume_training(resume_path, "pretrain", settings, model, optimizer)
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
            for group in optimizer.param_groups:
                group["lr"] = lr
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            # log
            if step % cfg.run.log_every == 0 or step == pretrain_cfg.pretrain_steps - 1:
                elapsed = max(time.time() - started, 1e-9)
                tokens_per_s = (step + 1 - start_step) * x.numel() / elapsed
                line = log_line(
                    "pretrain",
                    step,
                    pretrain_cfg.pretrain_steps,
                    started,
                    loss=loss.item(),
                    tok_per_s=int(tokens_per_s),
                )
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
    resume_path = out / "sae.resume.pt"
    settings = stage_settings(cfg, "sae")
    saved = load_resume(resume_path, "sae", settings) if cfg.run.resume else None
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
            resume=saved and saved["state"],
        )
    except FloatingPointError as error:
        raise UsageError(
            f"sae: {error}; training stopped; likely cause: --sae_lr too high; nothing was saved"
        ) from None
    except Interrupted as interrupted:
        save_resume(resume_path, settings, interrupted.step, interrupted.state)
        raise Interrupted("sae", interrupted.step, saved_to=resume_path) from None
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
    save_checkpoint(out / "sae.pt", "sae", settings, made_from, **sae.checkpoint(), metrics=metrics)
    write_json(out / "sae_metrics.json", metrics)
    resume_path.unlink(missing_ok=True)
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
        "dataset or tokenizer": fpo.fingerprint(token_ids, n_train),
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


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,), detached
    rejected_rewards: torch.Tensor  # (B,), detached
    feature_drifts: torch.Tensor | None  # D(y) of all 2B responses (FPO: part of its loss), or None


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
        feature_drifts = feature_drift(inputs.sae, hidden, mask, inputs.cache, rows, pref_cfg)
        losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
            avg_logps[:B], avg_logps[B:],
            reference_avg_logps[:B], reference_avg_logps[B:],
            feature_drifts[:B], feature_drifts[B:],
            beta=pref_cfg.beta, alpha=pref_cfg.alpha, stop_gradient=pref_cfg.fpo_stop_grad,
        )
        return PreferenceLoss(losses, chosen_rewards, rejected_rewards, feature_drifts.detach())
    if method == "simpo":  # no reference at all
        losses, chosen_rewards, rejected_rewards = fpo.simpo_loss(
            avg_logps[:B], avg_logps[B:], beta=pref_cfg.beta, gamma=pref_cfg.gamma
        )
        return PreferenceLoss(losses, chosen_rewards, rejected_rewards, None)
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
        return PreferenceLoss(losses, chosen_rewards, rejected_rewards, None)
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
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards, None)


def feature_drift(
    sae,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    cache: dict,
    rows: torch.Tensor,
    pref_cfg: PreferenceConfig,
) -> torch.Tensor:
    """Feature drift D(y) of each row: the policy's pooled codes against the cached reference's,
    top-pref_cfg.fpo_k, over the latents of --fpo_latents (all when empty).

    hidden (R, T, d_model), mask (R, T), rows (R,) -> (R,). Only the positions that generate
    response tokens are encoded (the rest are never pooled), and their TopK values are pooled
    sparsely: the same numbers and gradients as fpo.pooled_features of the dense codes, cheaper."""
    generating = mask[:, 1:].bool()  # position t generates response token t+1, as in sequence_logps
    values, indices = in_float32(sae.encode_topk, hidden[:, :-1][generating])  # (N, sae_k) each
    policy_pooled = fpo.pooled_topk_features(values, indices, mask, sae.d_sae)  # (R, d_sae)
    reference_pooled = fpo.reference_pooled_features(cache, rows)  # pooled_ref(y), (R, d_sae)
    latents = latent_list(pref_cfg.fpo_latents)
    if latents:  # a chosen set of latents: the others never enter D(y)
        policy_pooled = policy_pooled[:, latents]
        reference_pooled = reference_pooled[:, latents]
    return fpo.feature_mse(policy_pooled, reference_pooled, pref_cfg.fpo_k)


@torch.no_grad()
def policy_feature_drift(
    pref_cfg: PreferenceConfig,
    sae_layer: int,
    policy: GPT,
    batch,
    inputs: PreferenceInputs,
) -> torch.Tensor:
    """Feature drift D(y) of every response in a batch, for logging and evaluation. Shape: (2B,)."""
    rows, input_ids, mask = batch
    _, hidden = policy(input_ids, hidden_layer=sae_layer)
    return feature_drift(inputs.sae, hidden, mask, inputs.cache, rows, pref_cfg)


def train_preference(
    cfg: Config,
    device,
    seed: int,
    tag: str = "policy",
    *,
    measure=nullcontext(),
    snapshot_every: int = 0,
) -> dict:
    """Train one policy with cfg.prefer.method; save it as out_dir/<tag>.pt with a per-step JSONL
    log. `seed` fixes the batch order; the data and the starting weights are the same for every
    seed. For the experiments: `measure` is a context manager around the loop alone (its peak
    memory); snapshot_every > 0 also saves the policy every that many steps, as <tag>_step<N>.pt.
    Returns the median step time in seconds."""
    pref_cfg = cfg.prefer
    out = Path(cfg.run.out_dir)
    print(f"\n== prefer: {pref_cfg.method} ==\n{pref_cfg}")
    policy, gpt_fingerprint = load_gpt(cfg, device)  # starts as a copy of the reference
    inputs = load_preference_inputs(cfg, policy, gpt_fingerprint, device)
    reference = None
    if pref_cfg.method in ONLINE_REFERENCE:
        reference = load_gpt(cfg, device)[0].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pref_cfg.pref_lr, weight_decay=0.0)
    resume_path = out / f"{tag}.resume.pt"
    log_path = out / f"{tag}_log.jsonl"
    settings = stage_settings(cfg, "prefer", seed)
    start_step = 0
    if cfg.run.resume:
        start_step = resume_training(resume_path, "prefer", settings, policy, optimizer)
    # One JSON record per step; a resumed run keeps the records of the steps before it.
    records = []
    if start_step and log_path.exists():
        logged = [json.loads(line) for line in log_path.read_text().splitlines()]
        records = [record for record in logged if record["step"] < start_step]
    eos = data.eos_id(inputs.enc)
    policy.train()
    step_times = []
    started = time.time()

    def save_policy(path: Path) -> None:
        save_checkpoint(
            path,
            "policy",
            settings,
            inputs.made_from,
            model_config=asdict(policy.config),
            state_dict=policy.state_dict(),
        )

    def write_log() -> None:
        write_text(log_path, "".join(json.dumps(record) + "\n" for record in records))

    with stop_at_step_boundary() as stop, measure:
        for step in range(start_step, pref_cfg.pref_steps):
            if stop.is_set():  # Ctrl-C: save, and say how to continue
                write_log()
                save_resume(resume_path, settings, step, training_state(policy, optimizer))
                raise Interrupted("prefer", step, saved_to=resume_path)
            step_started = time.perf_counter()
            # learning rate: linear warm-up, then constant
            lr = learning_rate(
                step, pref_cfg.pref_lr, pref_cfg.warmup_steps, pref_cfg.pref_steps, "constant"
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            # batch: chosen rows, then rejected rows, with their cache rows
            picks = batch_indices(len(inputs.train_pairs), pref_cfg.pref_batch_size, seed, step)
            batch = data.pair_batch(inputs.train_pairs, picks, row_offset=0, eos_id=eos,
                                    device=device)
            # forward and loss
            with autocast(device):
                result = preference_losses(
                    pref_cfg, cfg.sae.sae_layer, policy, batch, inputs, reference
                )
            loss = result.losses.mean()
            # stop on a non-finite loss; save the last good state every log_every steps
            check_finite(loss, "prefer", step, resume_path,
                         "--pref_lr or --beta too high, or --beta/--alpha not finite")
            if step % cfg.run.log_every == 0:
                save_resume(resume_path, settings, step, training_state(policy, optimizer))
            # update
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), pref_cfg.grad_clip)
            optimizer.step()
            synchronize(device)
            step_times.append(time.perf_counter() - step_started)
            if snapshot_every and (step + 1) % snapshot_every == 0:
                save_policy(out / f"{tag}_step{step + 1}.pt")
            # log: every step to the JSONL file (written every log_every steps), every log_every-th
            # to the terminal
            feature_drifts = result.feature_drifts
            if feature_drifts is None:  # other methods: the same drift, outside the timed step
                feature_drifts = policy_feature_drift(
                    pref_cfg, cfg.sae.sae_layer, policy, batch, inputs
                )
            margins = result.chosen_rewards - result.rejected_rewards
            record = {
                "step": step,
                "loss": loss.item(),
                "margin": margins.mean().item(),
                "accuracy": (result.chosen_rewards > result.rejected_rewards).float().mean().item(),
                "feature_drift": feature_drifts.mean().item(),
                "ms_per_step": 1000 * step_times[-1],
            }
            records.append(record)
            if step % cfg.run.log_every == 0 or step == pref_cfg.pref_steps - 1:
                write_log()
                shown = {key: value for key, value in record.items() if key != "step"}
                print(log_line("prefer", step, pref_cfg.pref_steps, started, **shown), flush=True)
    check_finite_model(policy, "prefer", "--pref_lr or --beta too high", probe=batch[1])
    save_policy(out / f"{tag}.pt")
    resume_path.unlink(missing_ok=True)
    print(f"prefer: saved {out / f'{tag}.pt'} and {log_path}")
    return {"median_step_s": statistics.median(step_times) if step_times else float("nan")}


# ----------------------------------------------------------------------------------------------
# Stage 5: evaluation on held-out pairs and prompts (the metrics are evaluate.py's).


def load_policy(
    cfg: Config,
    tag: str,
    reference: GPT,
    inputs: PreferenceInputs,
    device,
) -> tuple[GPT, dict]:
    """The trained policy out_dir/<tag>.pt, frozen, refused unless it was trained from this
    reference and SAE; and the settings it was trained with."""
    path = Path(cfg.run.out_dir) / f"{tag}.pt"
    ckpt = load_checkpoint(path, "policy", "run `python train.py --stage prefer` first")
    if ckpt["model_config"] != asdict(reference.config):
        raise UsageError(
            f"{path} was trained from another GPT than {cfg.run.out_dir}/gpt.pt: "
            "rerun `--stage prefer`"
        )
    check_made_from(path, ckpt, inputs.made_from, "rerun `--stage prefer`")
    policy = restore(path, "rerun `--stage prefer`", lambda: gpt_from(ckpt)).to(device)
    return policy.eval().requires_grad_(False), ckpt["config"]


@torch.no_grad()
def held_out_accuracy(
    pref_cfg: PreferenceConfig,
    sae_layer: int,
    policy: GPT,
    reference: GPT,
    inputs: PreferenceInputs,
    device,
    split: str = "test",
) -> dict:
    """On the held-out pairs (cache rows after the training pairs'), or with split "train" on as
    many of the training pairs (the first ones): mean feature drift D(y), reward accuracy with
    the method's own reward, and with the implicit DPO reward log pi(y) - log pi_ref(y) (summed
    log-probs), one measure for every method."""
    accuracies, implicit_accuracies, feature_drifts = [], [], []
    eos = data.eos_id(inputs.enc)
    if split == "test":
        pairs, row_offset = inputs.test_pairs, len(inputs.train_pairs)
    else:
        pairs, row_offset = inputs.train_pairs[: len(inputs.test_pairs)], 0
    for batch in data.every_pair(pairs, 64, row_offset, eos, device):
        rows, input_ids, mask = batch
        B = len(rows) // 2
        with autocast(device):
            result = preference_losses(pref_cfg, sae_layer, policy, batch, inputs, reference)
            drifts = result.feature_drifts
            if drifts is None:  # FPO computed it for its loss; the other methods measure it here
                drifts = policy_feature_drift(pref_cfg, sae_layer, policy, batch, inputs)
            feature_drifts.append(drifts)
            logits, _ = policy(input_ids)
            reference_logps = inputs.cache["sum_logps"][rows.cpu()].to(device)
            implicit_reward = fpo.sequence_logps(logits, input_ids, mask)[0] - reference_logps
        accuracies.append((result.chosen_rewards > result.rejected_rewards).float())
        implicit_accuracies.append((implicit_reward[:B] > implicit_reward[B:]).float())
    return {
        "feature_drift": torch.cat(feature_drifts).mean().item(),
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
    training_accuracy: bool = False,
) -> dict:
    """Everything results.json holds for out_dir/<tag>.pt: held_out_accuracy, then the judge's
    comparison with the reference on held-out prompts, and the settings it all was made with.
    The reference's samples depend only on the seed: pass the same dict to reuse them across
    methods. The policy's own training settings (saved in <tag>.pt) decide its loss terms.
    training_accuracy: also the reward accuracy on training pairs (train_reward_accuracy)."""
    print(f"\n== eval: {tag} ==")
    reference, gpt_fingerprint = load_gpt(cfg, device)
    reference.eval().requires_grad_(False)
    inputs = load_preference_inputs(cfg, reference, gpt_fingerprint, device)
    policy, trained_with = load_policy(cfg, tag, reference, inputs, device)
    trained_cfg = settings_section(PreferenceConfig, trained_with)
    results = {"method": trained_cfg.method, "seed": seed}
    results |= held_out_accuracy(trained_cfg, cfg.sae.sae_layer, policy, reference, inputs, device)
    if training_accuracy:
        on_training_pairs = held_out_accuracy(
            trained_cfg, cfg.sae.sae_layer, policy, reference, inputs, device, split="train"
        )
        results["train_reward_accuracy"] = on_training_pairs["reward_accuracy"]
    prompt_texts, judged = held_out_prompts(cfg, inputs)
    results |= evaluate.judge_against_reference(
        policy,
        reference,
        prompt_texts,
        judged,
        inputs.enc,
        cfg.eval,
        seed,
        device,
        {} if reference_samples is None else reference_samples,
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
    print(report.summary_text(results, path))


def feature_report(cfg: Config, device) -> None:
    """--stage features: what the SAE latents mean: for each, the held-out response tokens that
    activate it most."""
    print("\n== features ==")
    model, gpt_fingerprint = load_gpt(cfg, device)
    inputs = load_preference_inputs(cfg, model, gpt_fingerprint, device)
    if cfg.run.latents:
        latents = latent_list(cfg.run.latents)
    else:
        latents = evaluate.most_constrained_latents(inputs.cache, cfg.prefer.fpo_k, n=8)
        print(f"features: the {len(latents)} latents most often in the reference's "
              f"top-{cfg.prefer.fpo_k} pooled features")
    eos = data.eos_id(inputs.enc)
    batches = (
        (input_ids, mask)
        for _, input_ids, mask in data.every_pair(inputs.test_pairs, 64, 0, eos, device)
    )
    report_text = top_activating_contexts(
        model, inputs.sae, batches, cfg.sae.sae_layer, latents, inputs.enc.decode
    )
    path = Path(cfg.run.out_dir) / "features.txt"
    write_text(path, report_text + "\n")
    print(f"{report_text}\nfeatures: wrote {path}")


if __name__ == "__main__":
    run_command(main)
