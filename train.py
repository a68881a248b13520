"""The whole FPO pipeline, top to bottom:

    pretrain the GPT -> train the SAE -> offline reference cache -> preference training -> evaluation

`python train.py` runs every stage; `python train.py --stage sae` (or cache, prefer, eval) runs one,
reading the earlier stages' outputs from --out_dir. Any config field is a flag: `--beta 2.0`.
`python train.py --help` lists them. `--compare` trains FPO and its baselines side by side;
`--bench` times their training steps.
"""

import dataclasses
import inspect
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import fpo
import sae as sae_lib
from model import GPT, GPTConfig

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
    compare: bool = False  # train FPO and every baseline on the same data and seeds; write a table
    seeds: int = 3  # how many seeds --compare runs per method
    bench: bool = False  # time training steps of each method on identical batches
    bench_steps: int = 50  # timed steps per method in --bench
    log_every: int = 50  # steps between progress lines, in every training stage
    latents: str = ""  # --stage features: comma-separated SAE latents to show; empty: the 8 FPO constrains most


@dataclass
class PretrainConfig:
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # residual stream width (the SAE's input width)
    block_size: int = 64  # context length in tokens
    n_docs: int = 20000  # toy-world pretraining documents
    pretrain_steps: int = 800  # optimizer steps
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
    alpha: float = 0.5  # weight of the feature constraint (FPO) or of SeqKL (TDPO-2)
    fpo_k: int = 32  # FPO's top-k features per side in D(y)
    gamma: float = 0.5  # SimPO target margin
    pref_steps: int = 150  # optimizer steps
    pref_batch_size: int = 16  # pairs per step
    pref_lr: float = 7e-5  # AdamW learning rate (constant after warm-up)
    warmup_steps: int = 10  # linear warm-up steps
    grad_clip: float = 1.0  # max gradient norm


@dataclass
class EvalConfig:
    n_eval_prompts: int = 300  # held-out prompts sampled from policy and reference
    temperature: float = 0.7  # sampling temperature
    top_k: int = 20  # sample among the top-k tokens; 0: the whole vocabulary
    max_new_tokens: int = 48  # response length cap when sampling


CONFIG_CLASSES = (RunConfig, PretrainConfig, SAEConfig, PreferenceConfig, EvalConfig)
STAGES = ("pretrain", "sae", "cache", "prefer", "eval")
METHODS = ("fpo", "dpo", "dpo_offline", "simpo", "tdpo1", "tdpo2")


def field_help(cls) -> dict[str, str]:
    """The trailing comment of each field in a config class's source: its --help text."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]+#\s*(.+)$", inspect.getsource(cls), flags=re.M))


def parse_args(argv: list[str]):
    """Build every stage's config from the defaults and `--key value` flags (bools: `--flag`)."""
    configs = {cls: cls() for cls in CONFIG_CLASSES}
    owner = {f.name: (cls, f) for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        for cls in CONFIG_CLASSES:
            print(f"{cls.__name__}:")
            for name, text in field_help(cls).items():
                print(f"  --{name:<20} {text} (default: {getattr(configs[cls], name)!r})")
        sys.exit(0)
    i = 0
    while i < len(argv):
        key = argv[i].removeprefix("--").replace("-", "_")
        if not argv[i].startswith("--") or key not in owner:
            raise UsageError(f"unknown option {argv[i]!r}; `python train.py --help` lists them")
        cls, f = owner[key]
        if f.type in (bool, "bool"):
            value, i = True, i + 1
            if i < len(argv) and argv[i].lower() in ("true", "false", "1", "0"):
                value, i = argv[i].lower() in ("true", "1"), i + 1
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"--{key} needs a value")
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            try:
                value = kind(argv[i + 1])
            except ValueError:
                raise UsageError(f"--{key}: expected {kind.__name__}, got {argv[i + 1]!r}") from None
            i += 2
        setattr(configs[cls], key, value)
    run, pre, sae_cfg, pref, ev = (configs[cls] for cls in CONFIG_CLASSES)
    if run.stage not in ("all", "features") + STAGES:
        raise UsageError(f"--stage must be one of all, {', '.join(STAGES)}, features; got {run.stage!r}")
    if pref.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}; got {pref.method!r}")
    return run, pre, sae_cfg, pref, ev


class UsageError(Exception):
    """A problem with the command line or with the user's files: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Device, checkpoints, interruption: each in exactly one place.


def pick_device(requested: str) -> torch.device:
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if requested not in available:
        raise UsageError(f"--device must be auto, cuda, mps or cpu; got {requested!r}")
    if not available[requested]:
        raise UsageError(f"--device {requested} was asked for, but this machine has no {requested} device")
    return torch.device(requested)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; a no-op elsewhere, so CPU runs stay exact and reproducible."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write never corrupts a good file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, kind: str, how_to_make: str) -> dict:
    if not path.exists():
        raise UsageError(f"{path} not found: {how_to_make}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, or not a torch file at all: whatever torch.load raised
        raise UsageError(f"{path} is not a readable checkpoint ({type(error).__name__}): delete it, then {how_to_make or 'rerun'}") from None
    saved_kind = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
    if saved_kind != kind:
        raise UsageError(f"{path} holds a {saved_kind!r}, not a {kind!r} checkpoint")
    return payload


def load_gpt(run: RunConfig, pre: PretrainConfig, device) -> GPT:
    """The pretrained GPT, checked against this run's model settings."""
    ckpt = load_checkpoint(Path(run.out_dir) / "gpt.pt", "gpt", "run `python train.py --stage pretrain` first")
    asked_config = asdict(pre) | {"vocab_size": data.load_tokenizer().n_vocab}  # a new tokenizer changes the vocabulary
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        saved, asked = ckpt["model_config"][name], asked_config[name]
        if saved != asked:
            raise UsageError(
                f"{run.out_dir}/gpt.pt was trained with {name}={saved}, but this run asks for {name}={asked}: "
                f"rerun `--stage pretrain` with these settings, or drop the override"
            )
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device)


def load_sae(run: RunConfig, model: GPT, device):
    ckpt = load_checkpoint(Path(run.out_dir) / "sae.pt", "sae", "run `python train.py --stage sae` first")
    sae = sae_lib.load_sae(ckpt)
    if sae.d_model != model.config.n_embd:
        raise UsageError(
            f"{run.out_dir}/sae.pt reads {sae.d_model}-wide vectors but the GPT's residual stream is "
            f"{model.config.n_embd} wide: rerun `--stage sae`"
        )
    return sae.to(device)


class Interrupted(Exception):
    """A training stage stopped early; its checkpoint is saved. Exit code 130, like Ctrl-C."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """Batch sampling is a pure function of (seed, step), so a resumed run draws the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def check_finite(loss: torch.Tensor, stage: str, step: int, last_good: Path | None) -> None:
    """A non-finite loss stops training before the update. Nothing is saved: these weights gave
    the bad loss, so the last good checkpoint (written every log_every steps) is kept as it is."""
    if not torch.isfinite(loss):
        kept = f"the last good checkpoint is {last_good}: lower the learning rate, then rerun with --resume" if last_good else "nothing was saved"
        raise UsageError(f"{stage}: the loss is {loss.item()} at step {step}; training stopped; {kept}")


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring peak memory from now: CUDA's counter, or Linux's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS


def peak_memory_mb(device: torch.device) -> float:
    """Max allocated on CUDA since reset_peak_memory; on the CPU the peak resident set size of the
    whole process (since reset_peak_memory on Linux, over its lifetime elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def log_line(stage: str, step: int, steps: int, started: float, **values) -> str:
    shown = " | ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items())
    return f"{stage} step {step:>5}/{steps} | {shown} | {time.time() - started:6.1f}s"


def lr_at(step: int, peak: float, warmup: int, total: int, cosine: bool) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Data: the toy world or the user's files, in one place.


def load_texts(run: RunConfig, pre: PretrainConfig) -> list[str]:
    if run.corpus_file:
        return data.load_corpus(run.corpus_file)
    return data.make_corpus(pre.n_docs, seed=run.seed)


def load_pairs(run: RunConfig, pref: PreferenceConfig):
    """(train pairs, held-out pairs). A user's file is split: its last n_test_pairs rows are held out."""
    if run.preference_file:
        pairs, dropped = data.load_preferences(run.preference_file, skip_bad_rows=run.skip_bad_rows)
        if dropped:
            print(f"data: dropped {dropped} malformed rows of {run.preference_file} (--skip_bad_rows)")
        n_test = min(pref.n_test_pairs, len(pairs) // 5)
        if n_test < 1:
            raise UsageError(
                f"{run.preference_file}: {len(pairs)} valid pairs and --n_test_pairs {pref.n_test_pairs} leave no held-out pair; "
                f"at least 5 pairs are needed (at most every fifth is held out)"
            )
        return pairs[: len(pairs) - n_test], pairs[len(pairs) - n_test :]
    return (
        data.make_preference_pairs(pref.n_pairs, seed=run.seed, split="train"),
        data.make_preference_pairs(pref.n_test_pairs, seed=run.seed, split="test"),
    )


def tokenize(pairs, enc, block_size: int, what: str):
    tokenized, dropped = data.tokenize_pairs(pairs, enc, block_size)
    if dropped:
        print(f"data: dropped {dropped} {what} pairs whose response would not fit the {block_size}-token context")
    if not tokenized:
        raise UsageError(f"no {what} pairs left after truncation to {block_size} tokens")
    return tokenized


def pair_batches(tokenized, batch_size: int, enc, device):
    """In order, every pair once: (pair index (B,), input_ids (2B, T), response_mask (2B, T))."""
    for start in range(0, len(tokenized), batch_size):
        index = torch.arange(start, min(start + batch_size, len(tokenized)))
        input_ids, mask = data.collate_pairs([tokenized[i] for i in index], data.eos_id(enc))
        yield index, input_ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------
# Stage 1: pretrain the GPT on the corpus.


def pretrain(run: RunConfig, pre: PretrainConfig, device) -> None:
    print(f"\n== pretrain ==\n{pre}")
    enc = data.load_tokenizer()
    tokens = data.corpus_token_stream(load_texts(run, pre), enc)
    print(f"pretrain: {len(tokens):,} tokens, vocabulary {enc.n_vocab}")
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=pre.block_size, n_layer=pre.n_layer, n_head=pre.n_head, n_embd=pre.n_embd)
    torch.manual_seed(run.seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pre.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    out, resume_path = Path(run.out_dir) / "gpt.pt", Path(run.out_dir) / "gpt.resume.pt"
    start_step = resume_training(run, resume_path, model, optimizer, "pretrain")
    started = time.time()
    with sae_lib.sigint_deferred_to_step_boundary() as stop:
        for step in range(start_step, pre.pretrain_steps):
            if stop.is_set():
                save_checkpoint(resume_path, training_state(model, optimizer, step, pre))
                raise Interrupted(f"pretrain interrupted at step {step}; saved {resume_path}; continue with --resume")
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, pre.pretrain_lr, 100, pre.pretrain_steps, cosine=True)
            x, y = data.sample_lm_batch(tokens, pre.pretrain_batch_size, pre.block_size, step_generator(run.seed, step))
            x, y = x.to(device), y.to(device)
            with autocast(device):
                logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            check_finite(loss, "pretrain", step, resume_path)
            if step % run.log_every == 0:  # the last good checkpoint: this step's weights gave a finite loss
                save_checkpoint(resume_path, training_state(model, optimizer, step, pre))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % run.log_every == 0 or step == pre.pretrain_steps - 1:
                tokens_per_s = (step + 1 - start_step) * x.numel() / max(time.time() - started, 1e-9)
                print(log_line("pretrain", step, pre.pretrain_steps, started, loss=loss.item(), tok_per_s=int(tokens_per_s)), flush=True)
    save_checkpoint(out, {"kind": "gpt", "model_config": asdict(config), "config": asdict(pre), "state_dict": model.state_dict()})
    resume_path.unlink(missing_ok=True)
    print(f"pretrain: saved {out}")


def training_state(model, optimizer, step: int, config) -> dict:
    return {"kind": "resume", "step": step, "config": asdict(config), "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}


def resume_training(run: RunConfig, resume_path: Path, model, optimizer, stage: str) -> int:
    """The step to start from: 0, or the saved step of an interrupted run when --resume is given."""
    if not run.resume:
        return 0
    if not resume_path.exists():
        print(f"{stage}: nothing to resume ({resume_path} not found); starting from step 0")
        return 0
    state = load_checkpoint(resume_path, "resume", "")
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError:  # missing keys or other shapes: the weights of another model config
        raise UsageError(f"--resume: {resume_path} holds a model of another config; delete it, or rerun with the settings it was saved with") from None
    optimizer.load_state_dict(state["optimizer"])
    print(f"{stage}: resuming from step {state['step']} ({resume_path})")
    return state["step"]


# ----------------------------------------------------------------------------------------------
# Stage 2: train the SAE on the GPT's residual stream.


def train_sae_stage(run: RunConfig, pre: PretrainConfig, sae_cfg: SAEConfig, device) -> None:
    print(f"\n== sae ==\n{sae_cfg}")
    enc = data.load_tokenizer()
    model = load_gpt(run, pre, device).eval()
    tokens = data.corpus_token_stream(load_texts(run, pre), enc)
    # The last sae_eval_tokens of the corpus are held out for the metrics.
    n_eval = min(sae_cfg.sae_eval_tokens, len(tokens) // 5)
    train_tokens, eval_tokens = tokens[:-n_eval], tokens[-n_eval:]
    train_chunks = contiguous_chunks(train_tokens, pre.block_size, sae_cfg.sae_tokens)
    eval_chunks = contiguous_chunks(eval_tokens, pre.block_size, n_eval)
    activations = sae_lib.harvest_activations(model, chunk_batches(train_chunks, 64, device), sae_cfg.sae_layer, sae_cfg.sae_tokens)
    resume_path = Path(run.out_dir) / "sae.resume.pt"
    resume = load_checkpoint(resume_path, "sae_resume", "")["state"] if run.resume and resume_path.exists() else None
    try:
        sae = sae_lib.train_sae(
            activations, sae_cfg.d_sae, sae_cfg.sae_k, steps=sae_cfg.sae_steps, batch_size=sae_cfg.sae_batch_size,
            lr=sae_cfg.sae_lr, seed=run.seed, log_every=run.log_every * 5, resume=resume,
        )
    except FloatingPointError as error:
        raise UsageError(f"sae: {error}; training stopped; nothing was saved: lower --sae_lr") from None
    except sae_lib.TrainingInterrupted as interrupted:
        save_checkpoint(resume_path, {"kind": "sae_resume", "state": interrupted.state})
        raise Interrupted(f"sae interrupted at step {interrupted.state['step']}; saved {resume_path}; continue with --resume") from None
    except ValueError as error:  # train_sae refuses a resume state made with other settings
        if resume is None:
            raise
        raise UsageError(f"--resume: {resume_path} does not fit this run ({error}); delete it, or rerun with the settings it was saved with") from None
    sae = sae.to(device)
    metrics = sae_lib.evaluate_sae(model, sae, chunk_batches(eval_chunks, 64, device), sae_cfg.sae_layer, train_activations=activations)
    out = Path(run.out_dir)
    save_checkpoint(out / "sae.pt", {"kind": "sae", **sae.checkpoint(), "config": asdict(sae_cfg), "metrics": metrics})
    (out / "sae_metrics.json").write_text(json.dumps(metrics, indent=2))
    resume_path.unlink(missing_ok=True)
    print(f"sae: saved {out / 'sae.pt'} and {out / 'sae_metrics.json'}")


def contiguous_chunks(tokens: torch.Tensor, block_size: int, max_tokens: int) -> torch.Tensor:
    """The token stream cut into (N, block_size) rows, at most max_tokens tokens in all."""
    n_rows = min(len(tokens), max_tokens) // block_size
    return tokens[: n_rows * block_size].view(n_rows, block_size)


def chunk_batches(chunks: torch.Tensor, batch_size: int, device):
    for start in range(0, len(chunks), batch_size):
        yield chunks[start : start + batch_size].to(device)


# ----------------------------------------------------------------------------------------------
# Stage 3: the offline reference cache: one reference pass, then no reference model at all.


def cache_fingerprint(reference_state: dict, sae_state: dict, train_tok, test_tok, sae_cfg: SAEConfig) -> dict[str, str]:
    """One hash per thing the cache is built from, so a stale cache can say what changed.
    The token ids stand for both the dataset and the tokenizer."""
    token_ids = json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in train_tok + test_tok])
    return {
        "reference model": fpo.fingerprint(reference_state),
        "SAE": fpo.fingerprint(sae_state, {"sae_layer": sae_cfg.sae_layer}),
        "dataset or tokenizer": fpo.fingerprint(token_ids, {"n_train_pairs": len(train_tok)}),
    }


def build_cache(run, sae_cfg, enc, reference: GPT, sae, train_tok, test_tok, device) -> dict:
    """Build and save the cache of every training and held-out response; rows: pair i's chosen is
    row 2i, its rejected row 2i+1 (`cache_rows`); training pairs first, then held-out pairs."""
    print("\n== cache ==")
    everything = train_tok + test_tok
    started = time.time()

    def batches():
        for batch_number, (index, input_ids, mask) in enumerate(pair_batches(everything, 64, enc, device)):
            yield cache_rows(index, row_offset=0), input_ids, mask
            if batch_number % 20 == 0 or index[-1] + 1 == len(everything):
                print(f"cache: {index[-1] + 1}/{len(everything)} pairs | {time.time() - started:.1f}s", flush=True)

    with sae_lib.eval_mode(reference), autocast(device):
        cache = fpo.build_reference_cache(
            lambda ids: reference(ids, hidden_layer=sae_cfg.sae_layer), sae.encode, batches(), n_rows=2 * len(everything), d_sae=sae.d_sae
        )
    cache.update(
        kind="reference_cache",
        fingerprint=cache_fingerprint(reference.state_dict(), sae.state_dict(), train_tok, test_tok, sae_cfg),
        n_train_pairs=len(train_tok),
    )
    path = Path(run.out_dir) / "reference_cache.pt"
    save_checkpoint(path, cache)
    print(f"cache: saved {path} ({cache['feature_values'].numel():,} non-zero pooled features for {2 * len(everything)} responses)")
    return cache


def cache_rows(index: torch.Tensor, row_offset: int) -> torch.Tensor:
    """The cache rows of a batch of pairs, chosen rows then rejected rows: (B,) -> (2B,).
    row_offset is len(train pairs) for held-out pairs, which follow the training pairs."""
    return torch.cat([2 * (index + row_offset), 2 * (index + row_offset) + 1])


def load_cache(run, sae_cfg, enc, policy: GPT, sae, train_tok, test_tok, device) -> dict:
    """The reference cache, rebuilt if its fingerprint doesn't match the data, SAE and the initial
    policy weights (which are the reference's: the policy starts as a copy of the reference)."""
    path = Path(run.out_dir) / "reference_cache.pt"
    expected = cache_fingerprint(policy.state_dict(), sae.state_dict(), train_tok, test_tok, sae_cfg)
    if path.exists():
        cache = load_checkpoint(path, "reference_cache", "")
        saved = cache.get("fingerprint") if isinstance(cache.get("fingerprint"), dict) else {}  # none in a cache from another version
        changed = [part for part in expected if saved.get(part) != expected[part]]
        if not changed:
            return cache
        print(f"cache: {path} is stale: it was built from another {' and '.join(changed)}; rebuilding")
    else:
        print(f"cache: {path} not found; building it")
    return build_cache(run, sae_cfg, enc, policy, sae, train_tok, test_tok, device)


# ----------------------------------------------------------------------------------------------
# Stage 4: preference training. One loop for every method; the losses are fpo.py's pure functions.


def feature_drift(sae, hidden: torch.Tensor, mask: torch.Tensor, cache: dict, rows: torch.Tensor, fpo_k: int) -> torch.Tensor:
    """D(y) of each row: the policy's pooled codes against the cached reference's.

    hidden (R, T, d_model), mask (R, T), rows (R,) -> (R,)."""
    policy_pooled = pooled_response_codes(sae, hidden, mask)  # (R, d_sae)
    reference_pooled = fpo.reference_pooled_features(cache, rows).to(policy_pooled.device)  # (R, d_sae)
    return fpo.feature_mse(policy_pooled, reference_pooled, fpo_k)


def pooled_response_codes(sae, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pooled(y) of every row, encoding only response positions: the rest are never pooled, and
    skipping them makes FPO's one extra piece of work (the SAE encode) about half as costly.

    hidden (R, T, d_model), mask (R, T) -> (R, d_sae)."""
    codes = hidden.new_zeros(*hidden.shape[:2], sae.d_sae)  # (R, T, d_sae)
    codes[mask] = sae.encode(hidden[mask])
    return fpo.pooled_features(codes, mask)


def preference_losses(method: str, pref: PreferenceConfig, policy, batch, cache, sae, reference, sae_layer: int, row_offset: int):
    """One concatenated chosen+rejected forward and the method's loss.

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,), feature_drift (2B,) or None):
    feature_drift is D(y) of all 2B responses for FPO, where it is part of the loss.
    """
    index, input_ids, mask = batch
    B = len(index)
    rows = cache_rows(index, row_offset)
    logits, hidden = policy(input_ids, hidden_layer=sae_layer if method == "fpo" else None)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)  # (2B,), (2B,)
    avg_logps = sum_logps / n_tokens
    if method == "simpo":
        return *fpo.simpo_loss(avg_logps[:B], avg_logps[B:], beta=pref.beta, gamma=pref.gamma), None
    reference_avg_logps = cache["avg_logps"][rows].to(avg_logps.device)  # (2B,)
    if method == "fpo":
        drift = feature_drift(sae, hidden, mask, cache, rows, pref.fpo_k)  # (2B,)
        losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
            avg_logps[:B], avg_logps[B:], reference_avg_logps[:B], reference_avg_logps[B:], drift[:B], drift[B:], beta=pref.beta, alpha=pref.alpha
        )
        return losses, chosen_rewards, rejected_rewards, drift.detach()
    if method == "dpo_offline":
        reference_logps = reference_avg_logps * n_tokens
        return *fpo.dpo_loss(sum_logps[:B], sum_logps[B:], reference_logps[:B], reference_logps[B:], beta=pref.beta), None
    with torch.no_grad():  # dpo, tdpo1, tdpo2: the reference model runs online, every step
        reference_logits, _ = reference(input_ids)
    reference_logps, _ = fpo.sequence_logps(reference_logits, input_ids, mask)
    if method == "dpo":
        return *fpo.dpo_loss(sum_logps[:B], sum_logps[B:], reference_logps[:B], reference_logps[B:], beta=pref.beta), None
    seq_kl = fpo.sequence_kl(logits, reference_logits, mask)  # (2B,)
    version = 1 if method == "tdpo1" else 2
    return *fpo.tdpo_loss(
        sum_logps[:B], sum_logps[B:], reference_logps[:B], reference_logps[B:], seq_kl[:B], seq_kl[B:], beta=pref.beta, alpha=pref.alpha, version=version
    ), None


def training_step(pref, policy, optimizer, batch, cache, sae, reference, sae_layer, device, step, resume_path: Path | None, save=False):
    """Forward, loss, backward, clip, step. Returns (loss, chosen_rewards, rejected_rewards, drift).
    resume_path is the last good checkpoint; with save=True this step's starting state is written
    there once its loss is known to be finite."""
    with autocast(device):
        losses, chosen_rewards, rejected_rewards, drift = preference_losses(
            pref.method, pref, policy, batch, cache, sae, reference, sae_layer, row_offset=0
        )
    loss = losses.mean()
    check_finite(loss, "prefer", step, resume_path)
    if save:
        save_checkpoint(resume_path, training_state(policy, optimizer, step, pref))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), pref.grad_clip)
    optimizer.step()
    return loss, chosen_rewards, rejected_rewards, drift


def load_preference_inputs(run, pre, sae_cfg, pref, device):
    """The tokenizer, a GPT holding the pretrained (reference) weights, the frozen SAE, and the
    tokenized training and held-out pairs: what the cache stage and preference training read."""
    enc = data.load_tokenizer()
    model = load_gpt(run, pre, device)
    sae = load_sae(run, model, device).eval().requires_grad_(False)
    train_pairs, test_pairs = load_pairs(run, pref)
    train_tok = tokenize(train_pairs, enc, pre.block_size, "training")
    test_tok = tokenize(test_pairs, enc, pre.block_size, "held-out")
    return enc, model, sae, train_tok, test_tok


def prepare_preference(run, pre, sae_cfg, pref, device):
    """What every preference-training method shares: data, the policy (a copy of the reference
    weights), the frozen SAE and the reference cache. The reference model itself is loaded only
    for the methods that need it online (dpo, tdpo1, tdpo2)."""
    enc, policy, sae, train_tok, test_tok = load_preference_inputs(run, pre, sae_cfg, pref, device)
    cache = load_cache(run, sae_cfg, enc, policy, sae, train_tok, test_tok, device)
    return enc, policy, sae, cache, train_tok, test_tok


def train_preference(run, pre, sae_cfg, pref, device, seed: int, tag: str = "policy") -> dict:
    """Train one policy with pref.method; save it as out_dir/<tag>.pt with a per-step JSONL log.
    `seed` fixes the batch order; the data and the starting weights are the same for every seed."""
    print(f"\n== prefer: {pref.method} ==\n{pref}")
    enc, policy, sae, cache, train_tok, test_tok = prepare_preference(run, pre, sae_cfg, pref, device)
    reference = load_gpt(run, pre, device).eval().requires_grad_(False) if pref.method in ("dpo", "tdpo1", "tdpo2") else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pref.pref_lr, weight_decay=0.0)
    out = Path(run.out_dir)
    resume_path, log_path = out / f"{tag}.resume.pt", out / f"{tag}_log.jsonl"
    start_step = resume_training(run, resume_path, policy, optimizer, "prefer")
    logged = log_path.read_text().splitlines() if start_step and log_path.exists() else []
    log_path.write_text("".join(line + "\n" for line in logged if json.loads(line)["step"] < start_step))  # steps from start_step are logged again
    policy.train()
    reset_peak_memory(device)  # peak memory of the training loop, with everything it needs loaded
    step_times, started = [], time.time()
    with sae_lib.sigint_deferred_to_step_boundary() as stop, log_path.open("a") as log:
        for step in range(start_step, pref.pref_steps):
            if stop.is_set():
                save_checkpoint(resume_path, training_state(policy, optimizer, step, pref))
                raise Interrupted(f"prefer interrupted at step {step}; saved {resume_path}; continue with --resume")
            step_started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, pref.pref_lr, pref.warmup_steps, pref.pref_steps, cosine=False)
            picks = torch.randint(0, len(train_tok), (pref.pref_batch_size,), generator=step_generator(seed, step))
            input_ids, mask = data.collate_pairs([train_tok[i] for i in picks], data.eos_id(enc))
            batch = (picks, input_ids.to(device), mask.to(device))
            loss, chosen_rewards, rejected_rewards, drift = training_step(
                pref, policy, optimizer, batch, cache, sae, reference, sae_cfg.sae_layer, device, step, resume_path, save=step % run.log_every == 0
            )
            step_times.append(time.perf_counter() - step_started)
            if drift is None:  # other methods: measure the same drift, outside the timed step
                drift = measure_drift(policy, sae, cache, batch, sae_cfg.sae_layer, pref.fpo_k, row_offset=0)
            record = {
                "step": step, "loss": loss.item(), "margin": (chosen_rewards - rejected_rewards).mean().item(),
                "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                "feature_drift": drift.mean().item(), "ms_per_step": 1000 * step_times[-1],
            }
            log.write(json.dumps(record) + "\n")  # every step; the terminal gets every log_every-th
            if step % run.log_every == 0 or step == pref.pref_steps - 1:
                log.flush()
                print(log_line("prefer", step, pref.pref_steps, started, **{k: v for k, v in record.items() if k != "step"}), flush=True)
    save_checkpoint(out / f"{tag}.pt", {"kind": "policy", "model_config": asdict(policy.config), "config": asdict(pref), "state_dict": policy.state_dict()})
    resume_path.unlink(missing_ok=True)
    print(f"prefer: saved {out / f'{tag}.pt'} and {log_path}")
    return {"median_step_s": statistics.median(step_times) if step_times else float("nan"), "peak_memory_mb": peak_memory_mb(device)}


@torch.no_grad()
def measure_drift(policy, sae, cache, batch, sae_layer: int, fpo_k: int, row_offset: int) -> torch.Tensor:
    """D(y) of every response in a batch, for logging and evaluation. Shape: (2B,)."""
    index, input_ids, mask = batch
    _, hidden = policy(input_ids, hidden_layer=sae_layer)
    return feature_drift(sae, hidden, mask, cache, cache_rows(index, row_offset), fpo_k)


# ----------------------------------------------------------------------------------------------
# Stage 5: evaluation on held-out prompts and pairs.


@torch.no_grad()
def sample_responses(model: GPT, prompts: list[list[int]], enc, ev: EvalConfig, seed: int, device) -> list[list[int]]:
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
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + length)
        with autocast(device):
            out = model.generate(idx, new_tokens, ev.temperature, ev.top_k or None, eos, generator).tolist()
        for i, row in zip(members, out):
            response = row[idx.shape[1] :]
            responses[i] = response[: response.index(eos) + 1] if eos in response else response
    return responses


@torch.no_grad()
def score_samples(model: GPT, reference: GPT, prompts, responses, enc, device) -> dict:
    """Per-token entropy of the model, and KL(model || reference) estimated on the model's own
    samples as the mean of log pi(y) - log pi_ref(y)."""
    eos = data.eos_id(enc)
    entropies, kls = [], []
    for start in range(0, len(prompts), 64):
        input_ids, mask = data.collate_responses(prompts[start : start + 64], responses[start : start + 64], eos)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits, _ = model(input_ids)
        reference_logits, _ = reference(input_ids)
        logps, _ = fpo.sequence_logps(logits, input_ids, mask)
        reference_logps, _ = fpo.sequence_logps(reference_logits, input_ids, mask)
        kls.append(logps - reference_logps)
        token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        token_entropy = -(token_logps.exp() * token_logps).sum(-1)  # (B, T-1)
        entropies.append(token_entropy[mask[:, 1:].bool()])
    entropies = torch.cat(entropies)  # every sampled response token; none if every sample was empty
    return {"entropy_per_token": entropies.sum().item() / max(1, len(entropies)), "kl_from_reference": torch.cat(kls).mean().item()}


def distinct_2(responses: list[list[int]]) -> float:
    """Unique token bigrams over all bigrams of the samples: 1 = no repetition across samples."""
    bigrams = [tuple(r[i : i + 2]) for r in responses for i in range(len(r) - 1)]
    return len(set(bigrams)) / max(1, len(bigrams))


def evaluate(run, pre, sae_cfg, pref, ev, device, seed: int, tag: str = "policy", reference_samples: dict | None = None) -> dict:
    """Judge win rate, judge score and validity on held-out prompts; reward accuracy and feature
    drift on held-out pairs; KL, entropy, distinct-2 and length of the samples. The reference's
    samples depend only on the seed: pass the same dict to reuse them across methods."""
    print(f"\n== eval: {tag} ==")
    enc, reference, sae, cache, train_tok, test_tok = prepare_preference(run, pre, sae_cfg, pref, device)
    reference.eval().requires_grad_(False)
    ckpt = load_checkpoint(Path(run.out_dir) / f"{tag}.pt", "policy", "run `python train.py --stage prefer` first")
    if ckpt["model_config"] != asdict(reference.config):
        raise UsageError(f"{run.out_dir}/{tag}.pt was trained from another GPT than {run.out_dir}/gpt.pt: rerun `--stage prefer`")
    policy = GPT(GPTConfig(**ckpt["model_config"])).to(device)
    policy.load_state_dict(ckpt["state_dict"])
    policy.eval().requires_grad_(False)
    method = ckpt["config"]["method"]

    accuracies, drifts = [], []
    for batch in pair_batches(test_tok, 64, enc, device):
        with autocast(device):
            _, chosen_rewards, rejected_rewards, drift = preference_losses(
                method, pref, policy, batch, cache, sae, reference, sae_cfg.sae_layer, row_offset=len(train_tok)
            )
            if drift is None:  # FPO computed it for its loss; the other methods measure it here
                drift = measure_drift(policy, sae, cache, batch, sae_cfg.sae_layer, pref.fpo_k, row_offset=len(train_tok))
            drifts.append(drift)
        accuracies.append((chosen_rewards > rejected_rewards).float())
    results = {
        "method": method, "seed": seed,
        "reward_accuracy": torch.cat(accuracies).mean().item(),
        "feature_drift": torch.cat(drifts).mean().item(),
    }

    if run.preference_file:  # the judge knows only the toy world: sample the held-out prompts, no scores
        prompt_texts = [enc.decode(pair.prompt_ids) for pair in test_tok]
    else:
        prompt_texts = data.make_prompts(ev.n_eval_prompts, seed=run.seed, split="test")
    prompts = [data.encode(enc, text)[-(pre.block_size // 2) :] for text in prompt_texts]  # keep half the context to respond
    reference_samples = {} if reference_samples is None else reference_samples
    if "responses" not in reference_samples:
        reference_samples["responses"] = sample_responses(reference, prompts, enc, ev, seed, device)
    policy_responses = sample_responses(policy, prompts, enc, ev, seed, device)
    for name, model, responses in (("policy", policy, policy_responses), ("reference", reference, reference_samples["responses"])):
        stats = score_samples(model, reference, prompts, responses, enc, device)
        stats.update(distinct_2=distinct_2(responses), mean_length=sum(map(len, responses)) / len(responses))
        if not run.preference_file:
            verdicts = [data.judge(text, data.response_text(enc, r)) for text, r in zip(prompt_texts, responses)]
            n = len(verdicts)
            stats.update(
                judge_score=sum(v.score for v in verdicts) / n, valid_rate=sum(v.valid for v in verdicts) / n,
                on_topic_rate=sum(v.on_topic for v in verdicts) / n, positive_rate=sum(v.positive for v in verdicts) / n,
            )
            stats["scores"] = [v.score for v in verdicts]
        results[name] = stats
    if not run.preference_file:
        wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(results["policy"].pop("scores"), results["reference"].pop("scores"))]
        results["win_rate"] = sum(wins) / len(wins)
    results["examples"] = [
        {"prompt": t, "reference": data.response_text(enc, r), "policy": data.response_text(enc, p)}
        for t, r, p in list(zip(prompt_texts, reference_samples["responses"], policy_responses))[:5]
    ]
    return results


def print_summary(results: dict, path: Path) -> None:
    print("\n== summary ==")
    print(f"method {results['method']} | held-out reward accuracy {results['reward_accuracy']:.3f} | feature drift {results['feature_drift']:.4g}")
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


def most_constrained_latents(cache: dict, fpo_k: int, n: int) -> list[int]:
    """The latents most often among the reference's top-fpo_k pooled features (half of the union
    I(y) in D(y)), counted over every cached response."""
    counts = Counter()
    offsets, indices, values = cache["feature_offsets"], cache["feature_indices"], cache["feature_values"]
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        top = values[start:end].topk(min(fpo_k, end - start)).indices
        counts.update(indices[start:end][top].tolist())
    return [latent for latent, _ in counts.most_common(n)]


def feature_report(run, pre, sae_cfg, pref, device) -> None:
    """What the SAE latents mean: for each, the held-out response tokens that activate it most."""
    print("\n== features ==")
    enc, model, sae, cache, _, test_tok = prepare_preference(run, pre, sae_cfg, pref, device)
    if run.latents:
        latents = [int(latent) for latent in run.latents.split(",")]
        if not all(0 <= latent < sae.d_sae for latent in latents):
            raise UsageError(f"--latents must lie in 0..{sae.d_sae - 1}; got {run.latents}")
    else:
        latents = most_constrained_latents(cache, pref.fpo_k, n=8)
        print(f"features: the {len(latents)} latents most often in the reference's top-{pref.fpo_k} pooled features")
    batches = ((input_ids, mask) for _, input_ids, mask in pair_batches(test_tok, 64, enc, device))
    report = sae_lib.top_activating_contexts(model, sae, batches, sae_cfg.sae_layer, latents, enc.decode)
    path = Path(run.out_dir) / "features.txt"
    path.write_text(report + "\n")
    print(f"{report}\nfeatures: wrote {path}")


# ----------------------------------------------------------------------------------------------
# --compare and --bench: FPO against its baselines on the same data, seeds and hardware.

# Per-method settings. beta is on the scale of each method's log-probs: summed for DPO and TDPO,
# averaged (about 15x smaller here) for FPO and SimPO; alpha and gamma as in the papers.
COMPARE_ROWS = {
    "FPO": {"method": "fpo", "beta": 2.0, "alpha": 0.5},
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
    "reward acc": (("reward_accuracy",), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
    "entropy": (("policy", "entropy_per_token"), 3),
    "distinct-2": (("policy", "distinct_2"), 3),
    "length": (("policy", "mean_length"), 1),
    "feature drift": (("feature_drift",), 4),
    "ms/step": (("median_step_ms",), 1),
    "peak MB": (("peak_memory_mb",), 0),
}


def in_child_process(function, *args):
    """Run function(*args) in a fresh process and return its result, so peak memory is the
    method's own and nothing (allocator state, caches) leaks from one method to the next."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def compare_tag(label: str, seed: int) -> str:
    return "compare_" + re.sub(r"\W+", "_", label.lower()).strip("_") + f"_seed{seed}"


def compare(run, pre, sae_cfg, pref, ev, device) -> None:
    out = Path(run.out_dir)
    if not (out / "gpt.pt").exists():
        pretrain(run, pre, device)
    if not (out / "sae.pt").exists():
        train_sae_stage(run, pre, sae_cfg, device)
    print(f"\n== compare: {', '.join(COMPARE_ROWS)} x {run.seeds} seeds ==")
    rows = []
    for seed in range(run.seed, run.seed + run.seeds):
        reference_samples = {}
        for label, overrides in COMPARE_ROWS.items():
            row_pref = dataclasses.replace(pref, **overrides)
            tag = compare_tag(label, seed)
            cost = in_child_process(train_preference, run, pre, sae_cfg, row_pref, device, seed, tag)
            results = evaluate(run, pre, sae_cfg, row_pref, ev, device, seed, tag, reference_samples)
            results.update(label=label, median_step_ms=1000 * cost["median_step_s"], peak_memory_mb=cost["peak_memory_mb"])
            rows.append(results)
    table = compare_table(rows, run.seeds)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps({"rows": rows, "settings": COMPARE_ROWS, "preference": asdict(pref)}, indent=2))
    print("\n" + table)
    for label in COMPARE_ROWS:
        print(text_chart(label, out / f"{compare_tag(label, run.seed)}_log.jsonl"))
    print(f"compare: wrote {out / 'compare.md'} and {out / 'compare.json'}")


def compare_table(rows: list[dict], n_seeds: int) -> str:
    """Markdown: one row per method, mean ± standard deviation over seeds."""
    lines = [
        f"| method | {' | '.join(TABLE_COLUMNS)} |",
        "|---" * (len(TABLE_COLUMNS) + 1) + "|",
    ]
    for label in COMPARE_ROWS:
        cells = []
        for path, digits in TABLE_COLUMNS.values():
            values = []
            for row in (r for r in rows if r["label"] == label):
                value = row
                for key in path:
                    value = value.get(key, float("nan")) if isinstance(value, dict) else float("nan")
                values.append(float(value))
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.{digits}f}{spread}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + f"\n\nMean ± standard deviation over {n_seeds} seed(s).\n"


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


def bench(run, pre, sae_cfg, pref, device) -> None:
    """Median training-step time of each method on identical batches, interleaved A B C A B C so
    drift in machine speed hits every method alike; then each method's peak memory, measured in a
    fresh process that loads only what that method needs."""
    print(f"\n== bench: {run.bench_steps} interleaved steps per method ==")
    enc, initial_policy, sae, cache, train_tok, _ = prepare_preference(run, pre, sae_cfg, pref, device)
    reference = load_gpt(run, pre, device).eval().requires_grad_(False)
    settings = {label: dataclasses.replace(pref, **overrides) for label, overrides in COMPARE_ROWS.items()}
    policies = {label: GPT(initial_policy.config).to(device) for label in settings}
    optimizers = {}
    for label, policy in policies.items():
        policy.load_state_dict(initial_policy.state_dict())
        optimizers[label] = torch.optim.AdamW(policy.parameters(), lr=settings[label].pref_lr)
    n_warmup = 3
    step_ms = {label: [] for label in settings}
    for step in range(n_warmup + run.bench_steps):
        picks = torch.randint(0, len(train_tok), (pref.pref_batch_size,), generator=step_generator(run.seed, step))
        input_ids, mask = data.collate_pairs([train_tok[i] for i in picks], data.eos_id(enc))
        batch = (picks, input_ids.to(device), mask.to(device))
        for label, row_pref in settings.items():
            started = time.perf_counter()
            training_step(row_pref, policies[label], optimizers[label], batch, cache, sae, reference, sae_cfg.sae_layer, device, step, None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= n_warmup:
                step_ms[label].append(1000 * (time.perf_counter() - started))
    results = {label: {"median_step_ms": statistics.median(times)} for label, times in step_ms.items()}
    for label, row_pref in settings.items():
        memory_pref = dataclasses.replace(row_pref, pref_steps=n_warmup + 2)
        cost = in_child_process(train_preference, run, pre, sae_cfg, memory_pref, device, run.seed, "bench_" + compare_tag(label, run.seed))
        results[label]["peak_memory_mb"] = cost["peak_memory_mb"]
    fpo_ms = results["FPO"]["median_step_ms"]
    ratios = {f"FPO/{other}": fpo_ms / results[other]["median_step_ms"] for other in ("SimPO", "DPO", "TDPO-2")}
    print(f"\n| method | median ms/step | peak memory MB ({'max allocated' if device.type == 'cuda' else 'peak RSS'}) |\n|---|---|---|")
    for label, values in results.items():
        print(f"| {label} | {values['median_step_ms']:.1f} | {values['peak_memory_mb']:.0f} |")
    print("\n" + " | ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
    path = Path(run.out_dir) / "bench.json"
    path.write_text(json.dumps({"device": str(device), "steps": run.bench_steps, "methods": results, "ratios": ratios}, indent=2))
    print(f"bench: wrote {path}")


# ----------------------------------------------------------------------------------------------


def check_user_files(run: RunConfig, pre: PretrainConfig, pref: PreferenceConfig) -> None:
    """Read the user's files once at start-up, so a bad file stops the run before any training."""
    enc = data.load_tokenizer()
    if run.corpus_file:
        n_tokens = len(data.corpus_token_stream(load_texts(run, pre), enc))
        if n_tokens < 5 * pre.block_size:  # pretraining windows, and the SAE's held-out fifth, need block_size each
            raise data.DataError(run.corpus_file, None, f"too short: {n_tokens} tokens, at least {5 * pre.block_size} (5 x block_size) are needed")
    if run.preference_file:
        train_pairs, test_pairs = load_pairs(run, pref)
        tokenize(train_pairs, enc, pre.block_size, "training")
        tokenize(test_pairs, enc, pre.block_size, "held-out")


# With --resume, `--stage all` skips the stages that finished: <name>.pt saved and no <name>.resume.pt.
STAGE_FILES = {"pretrain": "gpt", "sae": "sae", "cache": "reference_cache", "prefer": "policy"}


def stages_to_run(run: RunConfig) -> list[str]:
    """The stages of this command. `--stage all --resume` starts at the first stage that is
    unfinished (interrupted or never run); every stage after it runs too, as its inputs change."""
    if run.stage != "all":
        return [run.stage]
    stages, out = list(STAGES), Path(run.out_dir)
    while run.resume and stages[0] in STAGE_FILES:
        name = STAGE_FILES[stages[0]]
        if not (out / f"{name}.pt").exists() or (out / f"{name}.resume.pt").exists():
            break
        print(f"{stages[0]}: finished earlier ({out / name}.pt); skipped (--resume)")
        stages.pop(0)
    return stages


def main(argv: list[str]) -> None:
    run, pre, sae_cfg, pref, ev = parse_args(argv)
    device = pick_device(run.device)
    print(f"device: {device}\n{run}")
    check_user_files(run, pre, pref)
    if run.bench:
        return bench(run, pre, sae_cfg, pref, device)
    if run.compare:
        return compare(run, pre, sae_cfg, pref, ev, device)
    timings, started = {}, time.time()
    for stage in stages_to_run(run):
        stage_started = time.time()
        if stage == "pretrain":
            pretrain(run, pre, device)
        elif stage == "sae":
            train_sae_stage(run, pre, sae_cfg, device)
        elif stage == "cache":
            build_cache(run, sae_cfg, *load_preference_inputs(run, pre, sae_cfg, pref, device), device)
        elif stage == "prefer":
            train_preference(run, pre, sae_cfg, pref, device, seed=run.seed)
        elif stage == "features":
            feature_report(run, pre, sae_cfg, pref, device)
        else:
            results = evaluate(run, pre, sae_cfg, pref, ev, device, seed=run.seed)
            results["config"] = {cls.__name__: asdict(cfg) for cls, cfg in zip(CONFIG_CLASSES, (run, pre, sae_cfg, pref, ev))}
            path = Path(run.out_dir) / "results.json"
            path.write_text(json.dumps(results, indent=2))
            print_summary(results, path)
        timings[stage] = time.time() - stage_started
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
