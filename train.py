"""The whole FPO pipeline, top to bottom:

    pretrain the GPT -> train the SAE -> offline reference cache -> preference training -> evaluation

`python train.py` runs every stage; `python train.py --stage sae` (or cache, prefer, eval) runs one,
reading the earlier stages' outputs from --out_dir. Any config field is a flag: `--beta 2.0`;
`python train.py --help` lists them. `--sweep` tunes FPO and its baselines alike, `--compare` trains
each at its pick over several seeds, `--bench` times their steps (all in evaluate.py, with the eval stage).

Reading order: the configs, then each stage in turn. Preference training (`train_preference`) is one
loop: forward, loss (`preference_losses`, FPO's branch first), finite check, periodic save, backward,
clip, step, log. Devices, checkpoints, resume and Ctrl-C handling live in runtime.py.
"""

import argparse
import dataclasses
import inspect
import json
import math
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import data
import fpo
from runtime import (
    Interrupted, UsageError, autocast, batch_indices, check_finite, check_made_from, learning_rate, load_checkpoint, load_resume, in_float32, log_line,
    pick_device, precision, resume_training, save_checkpoint, save_resume, stages_to_run, stop_at_step_boundary, synchronize, training_state,
)
from model import GPT, GPTConfig
from sae import eval_mode, evaluate_sae, harvest_activations, load_sae, train_sae

# ----------------------------------------------------------------------------------------------
# Configs: one dataclass per stage. The comment after each field is its --help text.


@dataclass
class RunConfig:
    stage: str = "all"  # all (pretrain, sae, cache, prefer, eval, in order), one of those, or features
    out_dir: str = "out"  # where every checkpoint, cache, log and result goes
    seed: int = 1337  # one seed for data, init, batch order and sampling
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    resume: bool = False  # continue an interrupted training stage from its .resume.pt
    corpus_file: str = ""  # your own pretraining text (documents separated by blank lines); empty: the toy world
    preference_file: str = ""  # your own JSONL pairs {"prompt","chosen","rejected"}; empty: the toy world
    skip_bad_rows: bool = False  # drop malformed rows of --preference_file (counted) instead of stopping
    compare: bool = False  # train FPO and every baseline on the same data and seeds; write a table (evaluate.py)
    seeds: int = 5  # how many seeds --compare runs per method
    sweep: bool = False  # tune every method alike: a grid per method, picked on validation prompts (evaluate.py)
    bench: bool = False  # time training steps of each method on identical batches (evaluate.py)
    bench_steps: int = 50  # timed steps per method in --bench
    log_every: int = 50  # steps between progress lines, in every training stage
    threads: int = 0  # CPU threads for torch (1 rounds differently from 2); 0: torch's default
    latents: str = ""  # --stage features: comma-separated SAE latents to show; empty: the 8 FPO constrains most


@dataclass
class PretrainConfig:
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # residual stream width (the SAE's input width)
    block_size: int = 64  # context length in tokens
    n_docs: int = 20000  # toy-world pretraining documents
    pretrain_steps: int = 3000  # optimizer steps (the topics are learned late, after about 1500)
    pretrain_batch_size: int = 32  # sequences per step
    pretrain_lr: float = 2e-3  # peak AdamW learning rate (cosine decay after warm-up)


@dataclass
class SAEConfig:
    sae_layer: int = -1  # block whose output the SAE reads; -1: the last, before the final norm (as the paper)
    d_sae: int = 256  # SAE latents
    sae_k: int = 16  # SAE TopK: latents active per token
    sae_tokens: int = 300_000  # residual-stream vectors harvested for SAE training
    sae_eval_tokens: int = 100_000  # held-out vectors for the SAE metrics
    sae_steps: int = 2000  # SAE optimizer steps
    sae_batch_size: int = 1024  # vectors per SAE step
    sae_lr: float = 2e-3  # SAE Adam learning rate


@dataclass
class PreferenceConfig:
    method: str = "fpo"  # fpo, dpo, dpo_offline, simpo, tdpo1, tdpo2
    n_pairs: int = 4000  # toy-world training pairs
    n_test_pairs: int = 500  # held-out pairs (toy world), or the held-out share of --preference_file
    beta: float = 2.0  # scale of the log-prob differences (and of D in FPO)
    alpha: float = 16.0  # weight of the feature constraint (FPO) or of SeqKL (TDPO-2); 16: from FPO's --sweep grid
    fpo_k: int = 32  # FPO's top-k features per side in D(y)
    gamma: float = 0.5  # SimPO target margin
    pref_steps: int = 150  # optimizer steps
    pref_batch_size: int = 16  # pairs per step
    pref_lr: float = 6e-5  # AdamW learning rate (constant after warm-up); from FPO's --sweep grid
    warmup_steps: int = 10  # linear warm-up steps
    grad_clip: float = 1.0  # max gradient norm


@dataclass
class EvalConfig:
    eval_split: str = "test"  # the toy world's held-out prompts: test, or validation (what --sweep picks on)
    n_eval_prompts: int = 0  # distinct held-out prompts sampled from policy and reference; 0: all
    temperature: float = 0.9  # sampling temperature for the judged samples (the KL always uses temperature 1)
    top_k: int = 0  # sample among the top-k tokens; 0: the whole vocabulary
    max_new_tokens: int = 48  # response length cap when sampling


@dataclass
class Config:
    """Every stage's settings in one object; `python train.py --help` lists them by stage."""

    run: RunConfig = field(default_factory=RunConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    prefer: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


STAGES = ("pretrain", "sae", "cache", "prefer", "eval")
METHODS = ("fpo", "dpo", "dpo_offline", "simpo", "tdpo1", "tdpo2")
ONLINE_REFERENCE = ("dpo", "tdpo1", "tdpo2")  # the methods that run the reference model every step
CHOICES = {"stage": ("all", *STAGES, "features"), "method": METHODS, "device": ("auto", "cuda", "mps", "cpu"), "eval_split": ("test", "validation")}
# Flags that may be 0 or negative; every other number must be positive (and finite).
LOWER_BOUNDS = {"seed": 0, "alpha": 0, "gamma": 0, "warmup_steps": 0, "top_k": 0, "threads": 0, "n_eval_prompts": 0}
MAX_BLOCK_SIZE = 2048  # the learned position table and T x T attention grow with it


def field_help(cls) -> dict[str, str]:
    """The trailing comment of each field in a config class's source: its --help text."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]+#\s*(.+)$", inspect.getsource(cls), flags=re.M))


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # `--pref_lr -1e-3`, `--alpha -inf`: a value, not an unknown option, so the range check can name it
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str):
        """One `error:` line naming the flag (not argparse's usage block), then exit code 2."""
        message = re.sub(r"^argument (--\w+)(/--[\w-]+)*: ", r"\1: ", message)
        message = re.sub(r"^unrecognized arguments: (.*)", r"unknown option(s) \1; `python train.py --help` lists them", message)
        raise UsageError(message)


def build_parser() -> ArgumentParser:
    """Every config field becomes --name (and --name-with-dashes), with its comment as help."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section in dataclasses.fields(Config):
        group, defaults, helps = parser.add_argument_group(section.type.__name__), section.default_factory(), field_help(section.type)
        for f in dataclasses.fields(section.type):
            names, default = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []), getattr(defaults, f.name)
            if isinstance(default, bool):
                group.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name])
            else:
                group.add_argument(*names, type=type(default), default=default, choices=CHOICES.get(f.name), help=helps[f.name], metavar=type(default).__name__.upper())
    return parser


def parse_args(argv: list[str]) -> Config:
    """The Config of a command line, every value checked (see check_config) before any work."""
    flags = vars(build_parser().parse_args(argv))
    cfg = Config(**{s.name: s.type(**{f.name: flags[f.name] for f in dataclasses.fields(s.type)}) for s in dataclasses.fields(Config)})
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Refuse, with the flag, its value and the allowed range, any setting that would crash later
    or silently train something else."""

    def require(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            value = next(getattr(section, name) for section in vars(cfg).values() if hasattr(section, name))
            raise UsageError(f"--{name} {value!r}: must be {allowed}")

    for section in vars(cfg).values():
        for name, value in vars(section).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "sae_layer":
                low = LOWER_BOUNDS.get(name)
                require(name, math.isfinite(value), "a finite number")
                require(name, value > 0 if low is None else value >= low, "> 0" if low is None else f">= {low}")
    pre, sae = cfg.pretrain, cfg.sae
    require("seed", cfg.run.seed < 2**32, "below 2**32")
    require("n_head", pre.n_embd % pre.n_head == 0, f"a divisor of --n_embd {pre.n_embd}")
    require("block_size", pre.block_size <= MAX_BLOCK_SIZE, f"at most {MAX_BLOCK_SIZE}")
    require("sae_layer", -pre.n_layer <= sae.sae_layer < pre.n_layer, f"a block of the {pre.n_layer}-block GPT: {-pre.n_layer} to {pre.n_layer - 1}")
    require("sae_k", sae.sae_k <= sae.d_sae, f"at most --d_sae {sae.d_sae}")
    require("sae_tokens", sae.sae_tokens >= pre.block_size, f"at least --block_size {pre.block_size} (one context)")
    require("sae_eval_tokens", sae.sae_eval_tokens >= pre.block_size, f"at least --block_size {pre.block_size} (one context)")
    require("out_dir", cfg.run.out_dir.strip() != "", "a directory name")
    n_prompts = len(data.split_prompts(cfg.eval.eval_split))
    require("n_eval_prompts", cfg.run.preference_file or cfg.eval.n_eval_prompts <= n_prompts, f"at most {n_prompts} (the {cfg.eval.eval_split} split's distinct prompts)")
    require("latents", re.fullmatch(r"(\d+(,\d+)*)?", cfg.run.latents) is not None, "comma-separated latent numbers, e.g. 3,17")
    require("latents", all(int(latent) < sae.d_sae for latent in filter(None, cfg.run.latents.split(","))), f"below --d_sae {sae.d_sae}")


# ----------------------------------------------------------------------------------------------
# Loading each stage's inputs, each in exactly one place (devices, checkpoints: runtime.py).


def load_texts(cfg: Config) -> list[str]:
    return data.load_corpus(cfg.run.corpus_file) if cfg.run.corpus_file else data.make_corpus(cfg.pretrain.n_docs, seed=cfg.run.seed)


def load_pairs(cfg: Config):
    """(train pairs, held-out pairs): the toy world's, or the user's file split."""
    run, pref = cfg.run, cfg.prefer
    if run.preference_file:
        return data.split_preference_file(run.preference_file, run.skip_bad_rows, pref.n_test_pairs)
    return data.make_preference_pairs(pref.n_pairs, seed=run.seed, split="train"), data.make_preference_pairs(pref.n_test_pairs, seed=run.seed, split="test")


def tokenize(pairs, enc, block_size: int, what: str):
    tokenized, dropped = data.tokenize_pairs(pairs, enc, block_size)
    if dropped:
        print(f"data: dropped {dropped} {what} pairs whose response would not fit the {block_size}-token context")
    if not tokenized:
        raise UsageError(f"no {what} pairs left after truncation to {block_size} tokens")
    return tokenized


def load_gpt(cfg: Config, device) -> tuple[GPT, str]:
    """The pretrained GPT, checked against this run's model settings, and its fingerprint."""
    path = Path(cfg.run.out_dir) / "gpt.pt"
    ckpt = load_checkpoint(path, "gpt", "run `python train.py --stage pretrain` first")
    asked_config = asdict(cfg.pretrain) | {"vocab_size": data.load_tokenizer().n_vocab}  # a new tokenizer changes the vocabulary
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        saved, asked = ckpt["model_config"][name], asked_config[name]
        if saved != asked:
            raise UsageError(f"{path} was trained with {name}={saved}, but this run asks for {name}={asked}: rerun `--stage pretrain` with these settings, or drop the override")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), fpo.fingerprint(ckpt["state_dict"])  # of the weights themselves, so no edit escapes it


def load_trained_sae(cfg: Config, gpt_fingerprint: str, device) -> tuple[torch.nn.Module, str]:
    """The frozen SAE, refused unless it was trained on this GPT's residual stream at this layer."""
    path = Path(cfg.run.out_dir) / "sae.pt"
    ckpt = load_checkpoint(path, "sae", "run `python train.py --stage sae` first")
    check_made_from(path, ckpt, {"GPT": gpt_fingerprint, "layer": cfg.sae.sae_layer % cfg.pretrain.n_layer}, "rerun `--stage sae`")
    return load_sae(ckpt).to(device).eval().requires_grad_(False), fpo.fingerprint(ckpt["state_dict"])


# ----------------------------------------------------------------------------------------------
# Stage 1: pretrain the GPT on the corpus.


def pretrain(cfg: Config, device) -> None:
    pre = cfg.pretrain
    print(f"\n== pretrain ==\n{pre}")
    enc = data.load_tokenizer()
    tokens = data.corpus_token_stream(load_texts(cfg), enc)
    print(f"pretrain: {len(tokens):,} tokens, vocabulary {enc.n_vocab}")
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=pre.block_size, n_layer=pre.n_layer, n_head=pre.n_head, n_embd=pre.n_embd)
    torch.manual_seed(cfg.run.seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pre.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    out, resume_path, settings = Path(cfg.run.out_dir) / "gpt.pt", Path(cfg.run.out_dir) / "gpt.resume.pt", stage_settings(cfg, "pretrain")
    start_step = resume_training(resume_path, "pretrain", settings, model, optimizer) if cfg.run.resume else 0
    started = time.time()
    with stop_at_step_boundary() as stop:
        for step in range(start_step, pre.pretrain_steps):
            if stop.is_set():
                save_resume(resume_path, settings, step, training_state(model, optimizer))
                raise Interrupted("pretrain", step, saved_to=resume_path)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, pre.pretrain_lr, 100, pre.pretrain_steps, "cosine")
            starts = batch_indices(len(tokens) - pre.block_size, pre.pretrain_batch_size, cfg.run.seed, step)
            x, y = (t.to(device) for t in data.lm_windows(tokens, starts, pre.block_size))
            with autocast(device):
                logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            check_finite(loss, "pretrain", step, resume_path, "--pretrain_lr too high")
            if step % cfg.run.log_every == 0:  # the last good checkpoint: this step's weights gave a finite loss
                save_resume(resume_path, settings, step, training_state(model, optimizer))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % cfg.run.log_every == 0 or step == pre.pretrain_steps - 1:
                tokens_per_s = (step + 1 - start_step) * x.numel() / max(time.time() - started, 1e-9)
                print(log_line("pretrain", step, pre.pretrain_steps, started, loss=loss.item(), tok_per_s=int(tokens_per_s)), flush=True)
    save_checkpoint(out, "gpt", settings, {}, model_config=asdict(config), state_dict=model.state_dict())
    resume_path.unlink(missing_ok=True)
    print(f"pretrain: saved {out}")


def stage_settings(cfg: Config, stage: str, seed: int | None = None) -> dict:
    """The flags that decide a stage's result: saved with its output and its resume file."""
    section = {"pretrain": cfg.pretrain, "sae": cfg.sae, "prefer": cfg.prefer}[stage]
    files = {"corpus_file": cfg.run.corpus_file} if stage != "prefer" else {"preference_file": cfg.run.preference_file}
    return asdict(section) | files | {"seed": cfg.run.seed if seed is None else seed}


# ----------------------------------------------------------------------------------------------
# Stage 2: train the SAE on the GPT's residual stream.


def train_sae_stage(cfg: Config, device) -> None:
    sae_cfg, block_size = cfg.sae, cfg.pretrain.block_size
    print(f"\n== sae ==\n{sae_cfg}")
    enc = data.load_tokenizer()
    model, gpt_fingerprint = load_gpt(cfg, device)
    tokens = data.corpus_token_stream(load_texts(cfg), enc)
    # The last sae_eval_tokens of the corpus are held out for the metrics.
    n_eval = min(sae_cfg.sae_eval_tokens, len(tokens) // 5)
    train_chunks = data.contiguous_chunks(tokens[:-n_eval], block_size, sae_cfg.sae_tokens)
    eval_chunks = data.contiguous_chunks(tokens[-n_eval:], block_size, n_eval)
    activations = harvest_activations(model, data.chunk_batches(train_chunks, 64, device), sae_cfg.sae_layer, sae_cfg.sae_tokens)
    out, resume_path, settings = Path(cfg.run.out_dir), Path(cfg.run.out_dir) / "sae.resume.pt", stage_settings(cfg, "sae")
    saved = load_resume(resume_path, "sae", settings) if cfg.run.resume else None
    try:
        sae = train_sae(
            activations, sae_cfg.d_sae, sae_cfg.sae_k, steps=sae_cfg.sae_steps, batch_size=sae_cfg.sae_batch_size,
            lr=sae_cfg.sae_lr, seed=cfg.run.seed, log_every=cfg.run.log_every * 5, resume=saved and saved["state"],
        )
    except FloatingPointError as error:
        raise UsageError(f"sae: {error}; training stopped; likely cause: --sae_lr too high; nothing was saved") from None
    except Interrupted as interrupted:
        save_resume(resume_path, settings, interrupted.step, interrupted.state)
        raise Interrupted("sae", interrupted.step, saved_to=resume_path) from None
    sae = sae.to(device)
    metrics = evaluate_sae(model, sae, data.chunk_batches(eval_chunks, 64, device), sae_cfg.sae_layer, train_activations=activations)
    made_from = {"GPT": gpt_fingerprint, "layer": sae_cfg.sae_layer % cfg.pretrain.n_layer}
    save_checkpoint(out / "sae.pt", "sae", settings, made_from, **sae.checkpoint(), metrics=metrics)
    (out / "sae_metrics.json").write_text(json.dumps(metrics, indent=2))
    resume_path.unlink(missing_ok=True)
    print(f"sae: saved {out / 'sae.pt'} and {out / 'sae_metrics.json'}")


# ----------------------------------------------------------------------------------------------
# Stage 3: the offline reference cache: one reference pass, then no reference model at all.


@dataclass
class PreferenceInputs:
    """What preference training and evaluation read and never change."""

    enc: object  # the tokenizer (tiktoken.Encoding)
    sae: torch.nn.Module  # frozen: eval(), no gradients
    train_pairs: list  # data.TokenizedPair
    test_pairs: list
    cache: dict  # fpo.build_reference_cache's dict: avg_logp_ref and pooled_ref of every response
    made_from: dict  # fingerprints of the reference GPT and the SAE


CACHE_FORMAT = 2  # 2: pooled at the positions that generate the response tokens; summed log-probs stored


def load_preference_inputs(cfg: Config, reference: GPT, gpt_fingerprint: str, device, rebuild: bool = False) -> PreferenceInputs:
    """The SAE, the tokenized pairs, and the reference cache: built if `rebuild`, or if its
    fingerprint doesn't match the data, the SAE or `reference` (the pretrained weights the policy
    starts from)."""
    enc = data.load_tokenizer()
    sae, sae_fingerprint = load_trained_sae(cfg, gpt_fingerprint, device)
    train_pairs, test_pairs = load_pairs(cfg)
    inputs = PreferenceInputs(
        enc, sae, tokenize(train_pairs, enc, cfg.pretrain.block_size, "training"), tokenize(test_pairs, enc, cfg.pretrain.block_size, "held-out"),
        cache={}, made_from={"reference model": gpt_fingerprint, "SAE": sae_fingerprint},
    )
    token_ids = json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in inputs.train_pairs + inputs.test_pairs])
    expected = inputs.made_from | {
        "dataset or tokenizer": fpo.fingerprint(token_ids, {"n_train_pairs": len(inputs.train_pairs)}),
        "precision": precision(device), "cache format": CACHE_FORMAT,
    }
    path = Path(cfg.run.out_dir) / "reference_cache.pt"
    if path.exists() and not rebuild:
        cache = load_checkpoint(path, "reference_cache", "")
        changed = [part for part in expected if cache["made_from"].get(part) != expected[part]]
        if not changed:
            inputs.cache = cache
            return inputs
        print(f"cache: {path} is stale: it was built from another {' and '.join(changed)}; rebuilding")
    elif not rebuild:
        print(f"cache: {path} not found; building it")
    inputs.cache = build_cache(cfg, reference, inputs, expected, device)
    return inputs


def build_cache(cfg: Config, reference: GPT, inputs: PreferenceInputs, made_from: dict, device) -> dict:
    """Build and save the cache of every training and held-out response; training pairs first."""
    print("\n== cache ==")
    everything, started = inputs.train_pairs + inputs.test_pairs, time.time()

    def batches():
        for batch_number, batch in enumerate(data.every_pair(everything, 64, 0, data.eos_id(inputs.enc), device)):
            yield batch
            if batch_number % 20 == 0 or batch_number == (len(everything) - 1) // 64:
                print(f"cache: {min(64 * (batch_number + 1), len(everything))}/{len(everything)} pairs | {time.time() - started:.1f}s", flush=True)

    with eval_mode(reference), autocast(device):
        cache = fpo.build_reference_cache(
            lambda ids: reference(ids, hidden_layer=cfg.sae.sae_layer), lambda hidden: in_float32(inputs.sae.encode, hidden), batches(),
            n_rows=2 * len(everything), d_sae=inputs.sae.d_sae,
        )
    path = Path(cfg.run.out_dir) / "reference_cache.pt"
    save_checkpoint(path, "reference_cache", {"sae_layer": cfg.sae.sae_layer}, made_from, **cache, n_train_pairs=len(inputs.train_pairs))
    print(f"cache: saved {path} ({cache['feature_values'].numel():,} non-zero pooled features for {2 * len(everything)} responses)")
    return cache


# ----------------------------------------------------------------------------------------------
# Stage 4: preference training. One loop for every method; the losses are fpo.py's pure functions.


def preference_losses(pref: PreferenceConfig, sae_layer: int, policy: GPT, batch, inputs: PreferenceInputs, reference: GPT | None):
    """One concatenated chosen+rejected forward and the method's loss.

    batch: (cache rows (2B,), input_ids (2B, T), response_mask (2B, T)), chosen rows first.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,), feature_drift (2B,) or None):
    feature_drift is D(y) of all 2B responses for FPO, where it is part of the loss.
    """
    rows, input_ids, mask = batch
    B = len(rows) // 2
    logits, hidden = policy(input_ids, hidden_layer=sae_layer)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)  # (2B,), (2B,)
    avg_logps = sum_logps / n_tokens  # avg_logp_theta(y)
    reference_avg_logps = inputs.cache["avg_logps"][rows.cpu()].to(avg_logps.device)  # avg_logp_ref(y), cached
    if pref.method == "fpo":
        drift = feature_drift(inputs.sae, hidden, mask, inputs.cache, rows, pref.fpo_k)  # D(y), (2B,)
        losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
            avg_logps[:B], avg_logps[B:], reference_avg_logps[:B], reference_avg_logps[B:], drift[:B], drift[B:], beta=pref.beta, alpha=pref.alpha
        )
        return losses, chosen_rewards, rejected_rewards, drift.detach()
    if pref.method == "simpo":
        return *fpo.simpo_loss(avg_logps[:B], avg_logps[B:], beta=pref.beta, gamma=pref.gamma), None
    if pref.method == "dpo_offline":  # DPO with the reference's summed log-probs read from FPO's cache
        reference_logps = inputs.cache["sum_logps"][rows.cpu()].to(sum_logps.device)
        return *fpo.dpo_loss(sum_logps[:B], sum_logps[B:], reference_logps[:B], reference_logps[B:], beta=pref.beta), None
    with torch.no_grad():  # dpo, tdpo1, tdpo2: the reference model runs online, every step
        reference_logits, _ = reference(input_ids)
    reference_logps, _ = fpo.sequence_logps(reference_logits, input_ids, mask)
    if pref.method == "dpo":
        return *fpo.dpo_loss(sum_logps[:B], sum_logps[B:], reference_logps[:B], reference_logps[B:], beta=pref.beta), None
    seq_kl = fpo.sequence_kl(logits, reference_logits, mask)  # (2B,)
    return *fpo.tdpo_loss(
        sum_logps[:B], sum_logps[B:], reference_logps[:B], reference_logps[B:], seq_kl[:B], seq_kl[B:],
        beta=pref.beta, alpha=pref.alpha, version=1 if pref.method == "tdpo1" else 2,
    ), None


def feature_drift(sae, hidden: torch.Tensor, mask: torch.Tensor, cache: dict, rows: torch.Tensor, fpo_k: int) -> torch.Tensor:
    """D(y) of each row: the policy's pooled codes against the cached reference's.

    hidden (R, T, d_model), mask (R, T), rows (R,) -> (R,). Only the positions that generate
    response tokens are encoded (the rest are never pooled), and their TopK values are pooled
    sparsely: the same numbers and gradients as fpo.pooled_features of the dense codes, cheaper."""
    generating = mask[:, 1:].bool()  # position t generates response token t+1, as in sequence_logps
    values, indices = in_float32(sae.encode_topk, hidden[:, :-1][generating])  # (N, sae_k) each
    policy_pooled = fpo.pooled_topk_features(values, indices, mask, sae.d_sae)  # pooled_theta(y), (R, d_sae)
    reference_pooled = fpo.reference_pooled_features(cache, rows)  # pooled_ref(y), (R, d_sae)
    return fpo.feature_mse(policy_pooled, reference_pooled, fpo_k)


@torch.no_grad()
def measure_drift(pref: PreferenceConfig, sae_layer: int, policy: GPT, batch, inputs: PreferenceInputs) -> torch.Tensor:
    """D(y) of every response in a batch, for logging and evaluation. Shape: (2B,)."""
    rows, input_ids, mask = batch
    _, hidden = policy(input_ids, hidden_layer=sae_layer)
    return feature_drift(inputs.sae, hidden, mask, inputs.cache, rows, pref.fpo_k)


def train_preference(cfg: Config, device, seed: int, tag: str = "policy", measure=nullcontext(), snapshot_every: int = 0) -> dict:
    """Train one policy with cfg.prefer.method; save it as out_dir/<tag>.pt with a per-step JSONL log.
    `seed` fixes the batch order; the data and the starting weights are the same for every seed.
    `measure` is a context manager around the loop (evaluate.py measures its peak memory);
    snapshot_every > 0 also saves the policy every that many steps, as <tag>_step<N>.pt (--sweep)."""
    pref, out = cfg.prefer, Path(cfg.run.out_dir)
    print(f"\n== prefer: {pref.method} ==\n{pref}")
    policy, gpt_fingerprint = load_gpt(cfg, device)  # starts as a copy of the reference
    inputs = load_preference_inputs(cfg, policy, gpt_fingerprint, device)
    reference = load_gpt(cfg, device)[0].eval().requires_grad_(False) if pref.method in ONLINE_REFERENCE else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pref.pref_lr, weight_decay=0.0)
    resume_path, log_path, settings = out / f"{tag}.resume.pt", out / f"{tag}_log.jsonl", stage_settings(cfg, "prefer", seed)
    start_step = resume_training(resume_path, "prefer", settings, policy, optimizer) if cfg.run.resume else 0
    logged = log_path.read_text().splitlines() if start_step and log_path.exists() else []
    log_path.write_text("".join(line + "\n" for line in logged if json.loads(line)["step"] < start_step))  # steps from start_step are logged again
    policy.train()
    step_times, started = [], time.time()

    def save_policy(path: Path) -> None:
        save_checkpoint(path, "policy", settings, inputs.made_from, model_config=asdict(policy.config), state_dict=policy.state_dict())

    with stop_at_step_boundary() as stop, log_path.open("a") as log, measure:
        for step in range(start_step, pref.pref_steps):
            if stop.is_set():
                save_resume(resume_path, settings, step, training_state(policy, optimizer))
                raise Interrupted("prefer", step, saved_to=resume_path)
            step_started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, pref.pref_lr, pref.warmup_steps, pref.pref_steps, "constant")
            batch = data.pair_batch(inputs.train_pairs, batch_indices(len(inputs.train_pairs), pref.pref_batch_size, seed, step), 0, data.eos_id(inputs.enc), device)
            with autocast(device):
                losses, chosen_rewards, rejected_rewards, drift = preference_losses(pref, cfg.sae.sae_layer, policy, batch, inputs, reference)
            loss = losses.mean()
            check_finite(loss, "prefer", step, resume_path, "--pref_lr or --beta too high, or --beta/--alpha not finite")
            if step % cfg.run.log_every == 0:  # the last good checkpoint: this step's weights gave a finite loss
                save_resume(resume_path, settings, step, training_state(policy, optimizer))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), pref.grad_clip)
            optimizer.step()
            synchronize(device)
            step_times.append(time.perf_counter() - step_started)
            if snapshot_every and (step + 1) % snapshot_every == 0:
                save_policy(out / f"{tag}_step{step + 1}.pt")
            if drift is None:  # other methods: measure the same drift, outside the timed step
                drift = measure_drift(pref, cfg.sae.sae_layer, policy, batch, inputs)
            record = {
                "step": step, "loss": loss.item(), "margin": (chosen_rewards - rejected_rewards).mean().item(),
                "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                "feature_drift": drift.mean().item(), "ms_per_step": 1000 * step_times[-1],
            }
            log.write(json.dumps(record) + "\n")  # every step; the terminal gets every log_every-th
            if step % cfg.run.log_every == 0 or step == pref.pref_steps - 1:
                log.flush()
                print(log_line("prefer", step, pref.pref_steps, started, **{k: v for k, v in record.items() if k != "step"}), flush=True)
    save_policy(out / f"{tag}.pt")
    resume_path.unlink(missing_ok=True)
    print(f"prefer: saved {out / f'{tag}.pt'} and {log_path}")
    return {"median_step_s": statistics.median(step_times) if step_times else float("nan")}


# ----------------------------------------------------------------------------------------------


def check_inputs_and_outputs(cfg: Config) -> None:
    """Read the corpus and the pairs (the toy world's or the user's files) and try --out_dir once
    at start-up, so bad data, a data-dependent limit or an unwritable directory stops the run
    before any training."""
    enc, block_size = data.load_tokenizer(), cfg.pretrain.block_size
    n_tokens = len(data.corpus_token_stream(load_texts(cfg), enc))
    if n_tokens < 5 * block_size:  # pretraining windows, and the SAE's held-out fifth, need block_size each
        raise data.DataError(cfg.run.corpus_file or f"the toy corpus (--n_docs {cfg.pretrain.n_docs})", None, f"too short: {n_tokens} tokens, at least {5 * block_size} (5 x --block_size {block_size}) are needed")
    train_pairs, test_pairs = load_pairs(cfg)
    tokenize(train_pairs, enc, block_size, "training")
    tokenize(test_pairs, enc, block_size, "held-out")
    probe = Path(cfg.run.out_dir) / ".write_test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out_dir {cfg.run.out_dir!r} cannot be written to ({error.strerror})") from None


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    device = pick_device(cfg.run.device)
    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
    print(f"device: {device} ({torch.get_num_threads()} CPU threads)\n{cfg.run}")
    check_inputs_and_outputs(cfg)
    import evaluate  # the eval stage and the evidence (--compare, --bench, --sweep); it imports this file

    for mode in ("bench", "compare", "sweep"):
        if getattr(cfg.run, mode):
            return getattr(evaluate, mode)(cfg, device)
    timings, started = {}, time.time()
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
        elif stage == "features":
            evaluate.feature_report(cfg, device)
        else:
            evaluate.eval_stage(cfg, device)
        timings[stage] = time.time() - stage_started
    if "eval" in timings:  # the run's cost, next to its results
        path = Path(cfg.run.out_dir) / "results.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"seconds": timings}, indent=2))
    print("time per stage: " + ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings.items()) + f"; total {time.time() - started:.0f}s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UsageError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
