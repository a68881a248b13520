"""FPO on SmolLM2-135M-Instruct, offline, against TRL's own DPO and SimPO: the DPO paper's
controlled sentiment generation with VADER as the judge.

    python demo.py                   # the whole demo (23 minutes at one thread on 2 CPU cores)
    python demo.py --quick           # a smaller run of every stage (under 10 minutes)
    python demo.py --device cuda     # the same on a GPU

Five stages, one progress line each:
  1. pairs  sample completions of the training prompts, rank each prompt's by VADER
  2. sae    harvest the residual stream after --layer from those samples, train this repository's
            TopK SAE (sae.py) on it, report FVU, dead latents and CE loss recovered
  3. cache  FPO's offline reference cache (fpo.build_reference_cache, through FPOTrainer)
  4. train  FPO (integrations/trl's FPOTrainer), DPO (TRL's DPOTrainer), SimPO (TRL's CPOTrainer,
            loss_type="simpo"): the same top blocks trained, the same steps, batches and grid
  5. judge  sample every run on validation prompts (the pick of each method's learning rate)
            and test prompts; VADER, KL(policy || reference), fluency; the figure and tables

Everything goes to --out_dir: results.json, results.md (the tables and examples), frontier.png.
Bad flags stop with one line "error: ..." and exit code 2.
"""

import copy
import ctypes
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
NEEDED = ("datasets", "gguf", "matplotlib", "transformers", "trl", "vaderSentiment")
if __name__ == "__main__":  # the integration's own packages, beyond the core's: checked first
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: not installed: {', '.join(missing)}; pip install -r {REQUIREMENTS}",
              file=sys.stderr)
        sys.exit(2)

import matplotlib  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# smollm2 puts integrations/trl and the repository root on sys.path: import it first.
import smollm2  # noqa: E402
from fpo_trainer import REFERENCE_COLUMNS, FPOConfig, FPOTrainer  # noqa: E402
import sae as sae_lib  # noqa: E402
from config import build_parser, run_command  # noqa: E402
from evaluate import distinct_2  # noqa: E402
from runtime import UsageError, pick_device, write_json, write_text  # noqa: E402
from sentiment import Judge, make_prompts, rank_pair, sentiment_stats  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("fpo", "dpo", "simpo")
NAMES = {"fpo": "FPO", "dpo": "DPO", "simpo": "SimPO"}
STAGES = ("pairs", "sae", "cache", "train", "judge")


# ----------------------------------------------------------------------------------------------
# Settings: one dataclass per stage; the comment after each field is its --help.


@dataclass
class RunSettings:
    out_dir: str = "out/smollm2"  # where results.json, results.md and frontier.png go
    seed: int = 0  # one seed for sampling, the SAE, batch order
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    threads: int = 2  # CPU threads for torch
    quick: bool = False  # QUICK's smaller sizes for every setting left at its default


@dataclass
class PairSettings:
    n_train_prompts: int = 120  # training prompts (0: all 120)
    n_samples: int = 4  # completions sampled per training prompt, ranked by VADER
    max_new_tokens: int = 24  # tokens per completion, in the pairs and in evaluation
    min_gap: float = 0.3  # least VADER compound gap between chosen and rejected
    sample_batch_size: int = 32  # sequences per generate call


@dataclass
class SAESettings:
    layer: int = -2  # block whose output the SAE reads and FPO constrains; -2 is block 28 of 30
    d_sae: int = 2048  # SAE latents
    sae_k: int = 16  # latents active per token
    sae_tokens: int = 12000  # harvested vectors the SAE trains on
    sae_eval_tokens: int = 1500  # held-out vectors for FVU and CE loss recovered
    sae_steps: int = 800  # SAE training steps
    sae_batch_size: int = 512  # vectors per SAE step
    sae_lr: float = 2e-3  # SAE peak learning rate


@dataclass
class TrainSettings:
    train_blocks: int = 4  # top blocks trained, every other weight frozen, for every method
    steps: int = 32  # optimizer steps per run, for every method
    batch_size: int = 4  # pairs per step
    lrs: str = "1e-4,3e-4"  # the learning-rate grid, comma-separated, for every method
    max_length: int = 64  # tokens kept of prompt + completion
    fpo_beta: float = 2.0  # FPO's beta (length-normalised log-probs, as SimPO's)
    fpo_alpha: float = 256.0  # FPO's alpha, weight of D(y): the core's default (config.py)
    fpo_top_k: int = 32  # k of D(y): activated features each side contributes
    dpo_beta: float = 0.1  # DPO's beta (summed log-probs)
    simpo_beta: float = 2.0  # SimPO's beta
    simpo_gamma: float = 0.5  # SimPO's target margin gamma


@dataclass
class EvalSettings:
    n_validation_prompts: int = 24  # prompts that pick each method's learning rate (0: all 24)
    n_test_prompts: int = 48  # held-out prompts of the results (0: all 48)
    eval_batch_size: int = 16  # sequences per scoring forward


@dataclass
class DemoConfig:
    """Every setting of the demo; `python demo.py --help` lists them by section."""

    run: RunSettings = field(default_factory=RunSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    sae: SAESettings = field(default_factory=SAESettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


# What --quick changes (each only where the flag was left at its default).
QUICK = {"n_train_prompts": 32, "sae_tokens": 4000, "sae_eval_tokens": 800, "sae_steps": 300,
         "steps": 8, "n_validation_prompts": 8, "n_test_prompts": 16}


def parse_config(argv: list[str]) -> DemoConfig:
    """The demo's settings from the command line, --quick applied, every value checked."""
    flags = vars(build_parser(__doc__.split("\n")[0], "demo.py", DemoConfig).parse_args(argv))
    sections = {}
    for section in dataclasses.fields(DemoConfig):
        defaults = section.default_factory()
        values = {}
        for f in dataclasses.fields(section.type):
            value = flags[f.name]
            if flags["quick"] and f.name in QUICK and value == getattr(defaults, f.name):
                value = QUICK[f.name]
            values[f.name] = value
        sections[section.name] = section.type(**values)
    cfg = DemoConfig(**sections)
    check_config(cfg)
    return cfg


def learning_rates(cfg: DemoConfig) -> list[float]:
    """The grid of --lrs as floats: "1e-4,3e-4" -> [0.0001, 0.0003]."""
    try:
        return [float(text) for text in cfg.train.lrs.split(",")]
    except ValueError:
        raise UsageError(f"--lrs must be comma-separated numbers, got {cfg.train.lrs!r}") from None


def check_config(cfg: DemoConfig) -> None:
    """Refuse a bad value before any work, naming its flag."""
    lowest = {"seed": 0, "n_train_prompts": 0, "n_validation_prompts": 0, "n_test_prompts": 0,
              "fpo_alpha": 0, "simpo_gamma": 0, "min_gap": 0}
    for section in dataclasses.fields(cfg):
        for name, value in asdict(getattr(cfg, section.name)).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if name == "layer":
                continue
            least = lowest.get(name)
            ok = math.isfinite(value) and (value >= least if least is not None else value > 0)
            if not ok:
                bound = f">= {least}" if least is not None else "> 0"
                raise UsageError(f"--{name} must be a finite number {bound}, got {value}")
    if cfg.pairs.n_samples < 2:
        raise UsageError(f"--n_samples must be at least 2 to rank, got {cfg.pairs.n_samples}")
    if not -30 <= cfg.sae.layer < 30:
        raise UsageError(f"--layer {cfg.sae.layer} is out of range: SmolLM2 has 30 blocks")
    if not 0 < cfg.train.train_blocks <= 30:
        raise UsageError(f"--train_blocks must be 1 to 30, got {cfg.train.train_blocks}")
    if cfg.sae.layer % 30 < 30 - cfg.train.train_blocks:
        raise UsageError(f"--layer {cfg.sae.layer} is below the {cfg.train.train_blocks} trained "
                         f"blocks: the constraint would read a block training never changes")
    if cfg.sae.sae_k > cfg.sae.d_sae:
        raise UsageError(f"--sae_k {cfg.sae.sae_k} exceeds --d_sae {cfg.sae.d_sae}")
    if not all(lr > 0 and math.isfinite(lr) for lr in learning_rates(cfg)):
        raise UsageError(f"--lrs must be finite numbers > 0, got {cfg.train.lrs!r}")


# ----------------------------------------------------------------------------------------------
# Stage 1: pairs from the model's own samples, ranked by VADER


def make_pairs(model, tokenizer, judge: Judge, instructions: list[str], cfg: DemoConfig):
    """Sample cfg.pairs.n_samples completions per instruction and rank them with the judge.

    Returns (pairs, sequences): the kept pairs, and every sample as (prompt ids, completion ids),
    the SAE's harvest.
    """
    prompts = [smollm2.chat_prompt(instruction) for instruction in instructions]
    samples = smollm2.sample_completions(model, tokenizer, prompts, cfg.pairs.n_samples,
                                         cfg.pairs.max_new_tokens, cfg.pairs.sample_batch_size,
                                         seed=cfg.run.seed)
    pairs, sequences = [], []
    for prompt, completions in zip(prompts, samples, strict=True):
        texts = [smollm2.completion_text(tokenizer, c) for c in completions]
        pair = rank_pair(prompt, texts, judge.compound(texts), cfg.pairs.min_gap)
        if pair is not None:
            pairs.append(pair)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequences += [(prompt_ids, completion) for completion in completions]
    if len(pairs) < cfg.train.batch_size:
        raise UsageError(f"only {len(pairs)} prompts gave a pair with a VADER gap of at least "
                         f"--min_gap {cfg.pairs.min_gap}: lower it, or raise --n_train_prompts")
    return pairs, sequences


# ----------------------------------------------------------------------------------------------
# Stage 2: the SAE on the residual stream of the samples


def token_batches(sequences, pad_id: int, batch_size: int):
    """(ids (B, T), mask (B, T)) batches of whole [prompt, completion] sequences, the mask True at
    every real token: sae.py's token batches."""
    for start in range(0, len(sequences), batch_size):
        prompts, completions = zip(*sequences[start:start + batch_size])
        ids, _ = smollm2.prompt_completion_batch(list(prompts), list(completions), pad_id)
        lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions)])
        yield ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def train_sae_stage(model, sequences, pad_id: int, cfg: DemoConfig):
    """This repository's TopK SAE on block cfg.sae.layer's output, and its quality metrics on
    held-out samples (the last tenth of the sequences)."""
    n_held_out = max(1, len(sequences) // 10)
    lm = smollm2.ResidualStreamLM(model)
    batch_size = cfg.eval.eval_batch_size
    activations = sae_lib.harvest_activations(
        lm, token_batches(sequences[:-n_held_out], pad_id, batch_size), cfg.sae.layer,
        max_tokens=cfg.sae.sae_tokens)  # (N, 576)
    sae = sae_lib.train_sae(activations.to(next(model.parameters()).device), d_sae=cfg.sae.d_sae,
                            k=cfg.sae.sae_k, steps=cfg.sae.sae_steps,
                            batch_size=cfg.sae.sae_batch_size, lr=cfg.sae.sae_lr,
                            warmup_steps=cfg.sae.sae_steps // 10, seed=cfg.run.seed,
                            log_every=max(1, cfg.sae.sae_steps // 4))
    held_out = list(token_batches(sequences[-n_held_out:], pad_id, batch_size))
    metrics = sae_lib.evaluate_sae(lm, sae, truncate_batches(held_out, cfg.sae.sae_eval_tokens),
                                   cfg.sae.layer, train_activations=activations)
    return sae.eval().requires_grad_(False), metrics


def truncate_batches(batches: list, max_tokens: int) -> list:
    """The first batches whose real tokens add up to at least max_tokens (at least one)."""
    kept, n_tokens = [], 0
    for ids, mask in batches:
        if kept and n_tokens >= max_tokens:
            break
        kept.append((ids, mask))
        n_tokens += int(mask.sum())
    return kept


# ----------------------------------------------------------------------------------------------
# Stages 3 and 4: the cache, and the three methods through their trainers


class CachedFPOTrainer(FPOTrainer):
    """FPOTrainer that reads FPO's reference columns when the dataset already holds them: the
    cache is built once (stage 3) and every FPO run of the grid reuses it."""

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if set(REFERENCE_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def trainer_settings(cfg: DemoConfig, device: torch.device, lr: float, output_dir: Path) -> dict:
    """What every method's trainer shares: steps, batch, learning rate, schedule, seed, device."""
    return dict(
        output_dir=str(output_dir),
        learning_rate=lr,
        lr_scheduler_type="linear",
        max_steps=cfg.train.steps,
        per_device_train_batch_size=cfg.train.batch_size,
        max_length=cfg.train.max_length,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # the lower blocks are frozen: nothing to save there
        logging_steps=max(1, cfg.train.steps // 4),
        seed=cfg.run.seed,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def without_reference_columns(pairs: Dataset) -> Dataset:
    """The pairs as TRL's own trainers read them: prompt, chosen, rejected."""
    return pairs.remove_columns([name for name in REFERENCE_COLUMNS if name in pairs.column_names])


def build_cache_stage(base, sae, pairs: list, tokenizer, cfg: DemoConfig,
                      device: torch.device) -> Dataset:
    """The pairs with FPO's reference columns: FPOTrainer's own cache pass (its
    _precompute_ref_logps, fpo.build_reference_cache) over a copy of the untrained model."""
    plain = Dataset.from_list([asdict(pair) for pair in pairs])
    cache_dir = Path(cfg.run.out_dir) / "cache"
    settings = trainer_settings(cfg, device, learning_rates(cfg)[0], cache_dir)
    trainer = make_trainer("fpo", copy.deepcopy(base), sae, plain, tokenizer, settings, cfg)
    cached = trainer.train_dataset
    if len(cached) != len(plain):
        raise ValueError(f"the trainer kept {len(cached)} of {len(plain)} pairs")
    for name in REFERENCE_COLUMNS:
        plain = plain.add_column(name, cached[name])
    return plain


def make_trainer(method: str, policy, sae, pairs: Dataset, tokenizer, settings: dict,
                 cfg: DemoConfig):
    """FPO: integrations/trl's FPOTrainer (cached reference columns in `pairs`); DPO: TRL's
    DPOTrainer, its reference log-probs precomputed as FPO's are; SimPO: TRL's CPOTrainer."""
    plain_pairs = without_reference_columns(pairs)
    if method == "fpo":
        config = FPOConfig(**settings, beta=cfg.train.fpo_beta, fpo_alpha=cfg.train.fpo_alpha,
                           fpo_top_k=cfg.train.fpo_top_k, fpo_layer=cfg.sae.layer)
        return CachedFPOTrainer(policy, sae, config, train_dataset=pairs,
                                processing_class=tokenizer)
    elif method == "dpo":
        config = DPOConfig(**settings, beta=cfg.train.dpo_beta, precompute_ref_log_probs=True)
        return DPOTrainer(policy, args=config, train_dataset=plain_pairs,
                          processing_class=tokenizer)
    elif method == "simpo":
        config = CPOConfig(**settings, loss_type="simpo", cpo_alpha=0.0,
                           beta=cfg.train.simpo_beta, simpo_gamma=cfg.train.simpo_gamma,
                           remove_unused_columns=False)  # as CPOTrainer sets it, but silently
        return CPOTrainer(policy, args=config, train_dataset=plain_pairs,
                          processing_class=tokenizer)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


class PeakMemory:
    """Peak memory over a block, above what was in use when it began, in MiB: on CUDA the
    allocator's peak; on the CPU the process's resident set, sampled every 20 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            release_free_memory()  # so that memory freed before the block does not hide its peak
            self.start, self.peak, self.done = resident_bytes(), 0, threading.Event()
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.done.set()
            self.thread.join()
            peak = max(self.peak, resident_bytes())
        self.peak_mib = (peak - self.start) / 2**20


def release_free_memory() -> None:
    """Hand the C allocator's free memory back to the OS (glibc's malloc_trim; elsewhere none)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def train_run(method: str, lr: float, base, sae, pairs: Dataset, tokenizer, cfg: DemoConfig,
              device: torch.device) -> dict:
    """One run of the grid from the untrained model: the trained blocks' weights, the seconds per
    step and the peak memory of trainer.train(), and the trainer's log."""
    policy = copy.deepcopy(base)
    trained = smollm2.train_top_blocks(policy, cfg.train.train_blocks)
    settings = trainer_settings(cfg, device, lr, Path(cfg.run.out_dir) / "runs" / method)
    trainer = make_trainer(method, policy, sae, pairs, tokenizer, settings, cfg)
    with PeakMemory(device) as memory:
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    weights = {name: value.detach().cpu().clone()
               for name, value in policy.named_parameters() if name in trained}
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    print(f"train {method} lr {lr:g}: {seconds / cfg.train.steps:.2f}s/step, peak "
          f"{memory.peak_mib:.0f} MiB above start, last loss {log[-1]['loss']:.4f}", flush=True)
    return {"method": method, "lr": lr, "weights": weights, "log": log,
            "seconds_per_step": seconds / cfg.train.steps, "peak_mib": memory.peak_mib}


# ----------------------------------------------------------------------------------------------
# Stage 5: the judge on held-out prompts


def judge_model(model, reference, tokenizer, judge: Judge, instructions: list[str],
                cfg: DemoConfig) -> dict:
    """One sample per prompt: VADER's positive rate and mean compound, KL(model || reference)
    on those samples, the reference's per-token log-likelihood of them, distinct-2, the
    standard errors of the compound and the KL over prompts, and the first three samples."""
    prompts = [smollm2.chat_prompt(instruction) for instruction in instructions]
    completions = [samples[0] for samples in smollm2.sample_completions(
        model, tokenizer, prompts, n_samples=1, max_new_tokens=cfg.pairs.max_new_tokens,
        batch_size=cfg.pairs.sample_batch_size, seed=cfg.run.seed + 1)]
    texts = [smollm2.completion_text(tokenizer, c) for c in completions]
    scores = judge.compound(texts)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    scored = smollm2.score_completions(model, reference, prompt_ids, completions,
                                       tokenizer.pad_token_id, cfg.eval.eval_batch_size)
    return {
        **sentiment_stats(scores),
        "kl": sum(scored["kl"]) / len(scored["kl"]),
        "reference_logp_per_token": sum(scored["reference_logp"]) / sum(scored["n_tokens"]),
        "distinct_2": distinct_2(completions),
        "mean_tokens": sum(scored["n_tokens"]) / len(completions),
        "compound_se": standard_error(scores),
        "kl_se": standard_error(scored["kl"]),
        "examples": [{"prompt": instruction, "completion": text, "compound": score}
                     for instruction, text, score in zip(instructions[:3], texts, scores)],
    }


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of values (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def pick(runs: list[dict], method: str) -> dict:
    """The method's run with the highest mean VADER compound on the validation prompts."""
    return max((run for run in runs if run["method"] == method),
               key=lambda run: run["validation"]["mean_compound"])


# ----------------------------------------------------------------------------------------------
# Writing the results


COLOURS = {"reference": ("black", "s"), "fpo": ("tab:blue", "o"), "dpo": ("tab:orange", "^"),
           "simpo": ("tab:green", "D")}


def draw_frontier(reference: dict, runs: list[dict], path: Path) -> None:
    """Mean VADER compound against KL(policy || reference) on the test prompts: every run of the
    grid (a line per method, in learning-rate order), the picked runs filled; +- 1 standard
    error both ways."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colour, marker = COLOURS["reference"]
    ax.errorbar(0.0, reference["mean_compound"], yerr=reference["compound_se"], color=colour,
                marker=marker, linestyle="none", capsize=3, label="reference (SmolLM2)")
    for method in METHODS:
        colour, marker = COLOURS[method]
        mine = sorted((run for run in runs if run["method"] == method), key=lambda r: r["lr"])
        kls = [run["test"]["kl"] for run in mine]
        compounds = [run["test"]["mean_compound"] for run in mine]
        ax.errorbar(kls, compounds, xerr=[run["test"]["kl_se"] for run in mine],
                    yerr=[run["test"]["compound_se"] for run in mine], color=colour,
                    marker=marker, markerfacecolor="white", capsize=3, label=NAMES[method])
        picked = pick(runs, method)
        ax.plot(picked["test"]["kl"], picked["test"]["mean_compound"], color=colour,
                marker=marker, linestyle="none", zorder=5)
        offset = (6, 6 - 10 * METHODS.index(method))  # the methods' labels apart
        for run in mine:
            ax.annotate(f"lr {run['lr']:.0e}", (run["test"]["kl"], run["test"]["mean_compound"]),
                        textcoords="offset points", xytext=offset, fontsize=7, color=colour)
    ax.set_xlabel("KL(policy || reference), nats per completion (test prompts)")
    ax.set_ylabel("mean VADER compound (test prompts)")
    ax.set_title("SmolLM2-135M, controlled sentiment: reward against KL\n"
                 "filled: each method's learning rate picked on validation prompts", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(reference: dict, runs: list[dict]) -> str:
    """The markdown tables: each method's pick on the test prompts, then every run's validation
    numbers, then three example completions per method."""
    lines = ["| method | lr | positive rate | mean compound | KL(policy‖ref) | ref log-lik/token"
             " | distinct-2 | tokens | s/step | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(name: str, lr: str, test: dict, seconds: str, peak: str) -> str:
        return (f"| {name} | {lr} | {test['positive_rate']:.3f} | {test['mean_compound']:.3f} ± "
                f"{test['compound_se']:.3f} | {test['kl']:.2f} ± {test['kl_se']:.2f} | "
                f"{test['reference_logp_per_token']:.3f} | {test['distinct_2']:.3f} | "
                f"{test['mean_tokens']:.1f} | {seconds} | {peak} |")

    lines.append(row("reference", "-", reference["test"], "-", "-"))
    for method in METHODS:
        run = pick(runs, method)
        lines.append(row(NAMES[method], f"{run['lr']:g}", run["test"],
                         f"{run['seconds_per_step']:.2f}", f"{run['peak_mib']:.0f}"))
    lines += ["", "Every run, on the validation prompts (the pick: highest mean compound):", "",
              "| method | lr | positive rate | mean compound | KL | ref log-lik/token | "
              "final train loss |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        val = run["validation"]
        lines.append(f"| {NAMES[run['method']]} | {run['lr']:g} | {val['positive_rate']:.3f} | "
                     f"{val['mean_compound']:.3f} | {val['kl']:.2f} | "
                     f"{val['reference_logp_per_token']:.3f} | {run['log'][-1]['loss']:.4f} |")
    lines += ["", "Three test prompts, one sample each (VADER compound in brackets):", ""]
    for name, test in [("reference", reference["test"])] + [
            (NAMES[method], pick(runs, method)["test"]) for method in METHODS]:
        for example in test["examples"]:
            text = example["completion"].replace("\n", " ").replace("|", "/")
            lines.append(f"- **{name}**, *{example['prompt']}* [{example['compound']:+.3f}]: "
                         f"{text}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The demo


def main(argv: list[str]) -> None:
    cfg = parse_config(argv)
    print(f"config: {json.dumps(asdict(cfg))}", flush=True)
    torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg.run.device)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, seconds = time.time(), {}
    lrs = learning_rates(cfg)

    def done(stage: str, line: str) -> None:
        seconds[stage] = time.time() - started - sum(seconds.values())
        number = STAGES.index(stage) + 1
        print(f"== stage {number}/{len(STAGES)} {stage}: {line} | {seconds[stage]:.0f}s ==",
              flush=True)

    tokenizer = smollm2.load_tokenizer()
    base = smollm2.load_smollm2(device).requires_grad_(False)
    judge = Judge()
    seconds["load"] = time.time() - started
    print(f"loaded SmolLM2-135M-Instruct on {device} in {seconds['load']:.0f}s", flush=True)

    train_prompts = make_prompts("train", cfg.pairs.n_train_prompts, seed=cfg.run.seed)
    pairs, sequences = make_pairs(base, tokenizer, judge, train_prompts, cfg)
    (out / "pairs.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in pairs))
    done("pairs", f"{len(pairs)} pairs from {len(train_prompts)} prompts x "
                  f"{cfg.pairs.n_samples} samples")

    sae, sae_metrics = train_sae_stage(base, sequences, tokenizer.pad_token_id, cfg)
    sae_metrics.pop("density_histogram")
    done("sae", f"block {cfg.sae.layer % 30} | FVU {sae_metrics['fvu']:.4f} | dead "
                f"{sae_metrics['dead_fraction']:.3f} | CE recovered {sae_metrics['recovered']:.4f}")

    pairs_dataset = build_cache_stage(base, sae, pairs, tokenizer, cfg, device)
    done("cache", f"reference terms of {len(pairs)} pairs, no reference model kept")

    runs = []
    for method in METHODS:
        for lr in lrs:
            runs.append(train_run(method, lr, base, sae, pairs_dataset, tokenizer, cfg, device))
    done("train", f"{len(runs)} runs: {', '.join(METHODS)} x lr {cfg.train.lrs}, "
                  f"{cfg.train.steps} steps of {cfg.train.batch_size} pairs")

    validation = make_prompts("validation", cfg.eval.n_validation_prompts, seed=cfg.run.seed)
    test = make_prompts("test", cfg.eval.n_test_prompts, seed=cfg.run.seed)
    reference = {split: judge_model(base, base, tokenizer, judge, prompts, cfg)
                 for split, prompts in (("validation", validation), ("test", test))}
    policy = copy.deepcopy(base)
    for run in runs:
        policy.load_state_dict(run.pop("weights"), strict=False)
        for split, prompts in (("validation", validation), ("test", test)):
            run[split] = judge_model(policy, base, tokenizer, judge, prompts, cfg)
        print(f"judge {run['method']} lr {run['lr']:g}: validation compound "
              f"{run['validation']['mean_compound']:.3f}, test compound "
              f"{run['test']['mean_compound']:.3f}, KL {run['test']['kl']:.2f}", flush=True)
    draw_frontier(reference["test"], runs, out / "frontier.png")
    table = results_table(reference, runs)
    write_text(out / "results.md", table)
    done("judge", f"{len(validation)} validation, {len(test)} test prompts")

    machine = {"device": str(device), "threads": cfg.run.threads, "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__}
    write_json(out / "results.json", {"config": asdict(cfg), "machine": machine,
                                      "seconds": seconds, "sae": sae_metrics,
                                      "reference": reference, "runs": runs})
    print(table, flush=True)
    shown = ", ".join(f"{stage} {value:.0f}s" for stage, value in seconds.items())
    print(f"time per stage: {shown}; total {time.time() - started:.0f}s", flush=True)
    print(f"results: {out}/results.json, results.md, frontier.png", flush=True)


if __name__ == "__main__":
    run_command(main)
