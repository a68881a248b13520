"""Every setting of the pipeline: one dataclass per stage, the command line built from them, and
the start-up checks that refuse a bad value before any work.

The comment after each field is its `--help` text. `python train.py --beta 1.0` sets
`Config.prefer.beta`; `python train.py --help` lists every field by stage with its default.
"""

import argparse
import dataclasses
import functools
import inspect
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import data
from runtime import Interrupted, UsageError


@dataclass
class RunConfig:
    stage: str = "all"  # all (pretrain, sae, cache, prefer, eval), or one of them
    out_dir: str = "out"  # where every checkpoint, cache, log and result goes
    seed: int = 1337  # one seed for data, init, batch order and sampling
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    resume: bool = False  # continue an interrupted training stage from its .resume.pt
    corpus_file: str = ""  # your pretraining text (blank lines split documents); empty: toy world
    preference_file: str = ""  # your JSONL pairs {"prompt","chosen","rejected"}; empty: toy world
    skip_bad_rows: bool = False  # drop (and count) malformed rows of --preference_file; no stop
    log_every: int = 50  # steps between progress lines, in every training stage
    threads: int = 0  # CPU threads for torch (1 rounds differently from 2); 0: torch's default


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
    sae_layer: int = -1  # block whose output the SAE reads; -1: the last, before the final norm
    d_sae: int = 256  # SAE latents
    sae_k: int = 16  # SAE TopK: latents active per token
    sae_tokens: int = 300_000  # residual-stream vectors harvested for SAE training
    sae_eval_tokens: int = 100_000  # held-out vectors for the SAE metrics
    sae_steps: int = 2000  # SAE optimizer steps
    sae_batch_size: int = 1024  # vectors per SAE step
    sae_lr: float = 2e-3  # SAE Adam learning rate


@dataclass
class PreferenceConfig:
    method: str = "fpo"  # fpo, fpo_kl, dpo, dpo_offline, simpo, tdpo1, tdpo2
    n_pairs: int = 4000  # toy-world training pairs
    n_test_pairs: int = 500  # held-out pairs (toy world), or those held out of --preference_file
    beta: float = 1.0  # scale of the log-prob differences (and of D in FPO); FPO's sweep pick
    alpha: float = 256.0  # weight of FPO's feature constraint or TDPO-2's SeqKL; FPO's sweep pick
    fpo_k: int = 32  # FPO's top-k features per side in D(y)
    fpo_latent_weights: str = ""  # FPO: w_i in D(y) as latent:weight,... (e.g. 3:0,17:4); others 1
    fpo_stop_grad: bool = True  # FPO: no gradient through D(y_w) (the paper); --no-...: let it flow
    gamma: float = 0.5  # SimPO target margin
    pref_steps: int = 200  # optimizer steps; FPO's sweep pick
    pref_batch_size: int = 16  # pairs per step
    pref_lr: float = 1.8e-4  # AdamW learning rate (constant after warm-up); FPO's sweep pick
    warmup_steps: int = 10  # linear warm-up steps
    grad_clip: float = 1.0  # max gradient norm


@dataclass
class EvalConfig:
    eval_split: str = "test"  # held-out prompts: test, or validation (what --sweep picks on)
    n_eval_prompts: int = 0  # distinct held-out prompts sampled from policy and reference; 0: all
    temperature: float = 0.9  # sampling temperature of judged samples (the KL always uses 1)
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
METHODS = ("fpo", "fpo_kl", "dpo", "dpo_offline", "simpo", "tdpo1", "tdpo2")
# The methods that run the reference model every step. fpo_kl is FPO with SeqKL(y) in place of
# D(y): the same logit, offline margin, alpha and stop-gradient; only its constraint differs.
ONLINE_REFERENCE = ("fpo_kl", "dpo", "tdpo1", "tdpo2")
CHOICES = {
    "stage": ("all", *STAGES),
    "method": METHODS,
    "device": ("auto", "cuda", "mps", "cpu"),
    "eval_split": ("test", "validation"),
}
# The lowest value of each flag that may be 0; every other number must be positive (and finite).
LOWER_BOUNDS = {"seed": 0, "alpha": 0, "gamma": 0, "warmup_steps": 0, "top_k": 0, "threads": 0,
                "n_eval_prompts": 0}
MAX_BLOCK_SIZE = 2048  # the learned position table and T x T attention grow with it


def run_command(main) -> None:
    """main(sys.argv[1:]), keeping the command line's promise: a bad flag or file is one `error:`
    line and exit code 2; Ctrl-C says how to continue, with exit code 130. Output survives an
    ASCII-only terminal (other characters are escaped), and a reader that closes stdout early
    (`python train.py | head -1`) does not stop the run: it goes on, writing its files."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    sys.stdout = QuietWhenClosed(sys.stdout)
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


class QuietWhenClosed:
    """stdout, but once its reader has gone (a broken pipe) it writes to the null device instead
    of raising in the middle of training."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._quietly(self.stream.write, text)

    def flush(self) -> None:
        self._quietly(self.stream.flush)

    def _quietly(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            return len(args[0]) if args else None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


# ----------------------------------------------------------------------------------------------
# The command line: generated from the dataclasses above.


@functools.cache  # inspect parses the whole file to find a class: once per class, not per parse
def field_help(cls) -> dict[str, str]:
    """The trailing comment of each field in a config class's source: its --help text."""
    source = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^#\n]+#\s*(.+)$", source, flags=re.M))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors as one `error:` line (UsageError) and negative numbers as values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # `--pref_lr -1e-3`, `--alpha -inf`: a value the range check names, not an unknown option
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I
        )

    def error(self, message: str):
        """One `error:` line naming the flag (not argparse's usage block), then exit code 2."""
        message = re.sub(r"^argument (--\w+)(/--[\w-]+)*: ", r"\1: ", message)
        help_hint = f"`python {self.prog} --help`"
        unknown = r"^unrecognized arguments: (.*)"
        message = re.sub(unknown, rf"unknown option(s) \1; {help_hint} lists them", message)
        missing = r"^(the following arguments are required: .*)"
        message = re.sub(missing, rf"\1; {help_hint} shows the usage", message)
        raise UsageError(message)


def build_parser(description: str, prog: str = "train.py", config_type=Config) -> ArgumentParser:
    """Every field of config_type's sections becomes --name (and --name-with-dashes), with its
    comment as help. config_type: Config, or a subclass with more sections (the experiments')."""
    parser = ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section in dataclasses.fields(config_type):
        group = parser.add_argument_group(section.type.__name__)
        defaults = section.default_factory()
        helps = field_help(section.type)
        for f in dataclasses.fields(section.type):
            names = [f"--{f.name}"]
            if "_" in f.name:
                names.append(f"--{f.name.replace('_', '-')}")
            default = getattr(defaults, f.name)
            if isinstance(default, bool):  # --name and --no-name
                options = {"action": argparse.BooleanOptionalAction}
            else:
                options = {
                    "type": type(default),
                    "choices": CHOICES.get(f.name),
                    "metavar": type(default).__name__.upper(),
                }
            group.add_argument(*names, default=default, help=helps[f.name], **options)
    return parser


def parse_args(
    argv: list[str], description: str = "", prog: str = "train.py", config_type=Config
) -> Config:
    """The config of a command line, every pipeline value checked (see check_config) before any
    work; a subclass's extra sections are its own to check."""
    flags = vars(build_parser(description, prog, config_type).parse_args(argv))
    sections = {}
    for section in dataclasses.fields(config_type):
        names = [f.name for f in dataclasses.fields(section.type)]
        sections[section.name] = section.type(**{name: flags[name] for name in names})
    cfg = config_type(**sections)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Refuse, with the flag, its value and the allowed range, any setting that would crash later
    or silently train something else."""

    def require(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            sections = vars(cfg).values()
            value = next(getattr(s, name) for s in sections if hasattr(s, name))
            raise UsageError(f"--{name} {value!r}: must be {allowed}")

    for section in (cfg.run, cfg.pretrain, cfg.sae, cfg.prefer, cfg.eval):
        for name, value in vars(section).items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and name != "sae_layer":
                require(name, math.isfinite(value), "a finite number")
                if name in LOWER_BOUNDS:
                    require(name, value >= LOWER_BOUNDS[name], f">= {LOWER_BOUNDS[name]}")
                else:
                    require(name, value > 0, "> 0")
    pretrain_cfg, sae_cfg = cfg.pretrain, cfg.sae
    n_layer, block_size = pretrain_cfg.n_layer, pretrain_cfg.block_size
    one_context = f"at least --block_size {block_size} (one context)"
    require("seed", cfg.run.seed < 2**32, "below 2**32")
    require("n_head", pretrain_cfg.n_embd % pretrain_cfg.n_head == 0,
            f"a divisor of --n_embd {pretrain_cfg.n_embd}")
    require("block_size", block_size <= MAX_BLOCK_SIZE, f"at most {MAX_BLOCK_SIZE}")
    require("sae_layer", -n_layer <= sae_cfg.sae_layer < n_layer,
            f"a block of the {n_layer}-block GPT: {-n_layer} to {n_layer - 1}")
    require("sae_k", sae_cfg.sae_k <= sae_cfg.d_sae, f"at most --d_sae {sae_cfg.d_sae}")
    require("sae_tokens", sae_cfg.sae_tokens >= block_size, one_context)
    require("sae_eval_tokens", sae_cfg.sae_eval_tokens >= block_size, one_context)
    require("out_dir", cfg.run.out_dir.strip() != "", "a directory name")
    n_prompts = len(data.split_prompts(cfg.eval.eval_split))
    require("n_eval_prompts", cfg.run.preference_file or cfg.eval.n_eval_prompts <= n_prompts,
            f"at most {n_prompts} (the {cfg.eval.eval_split} split's distinct prompts)")
    require("fpo_latent_weights", latent_weights(cfg.prefer.fpo_latent_weights, sae_cfg.d_sae),
            f"latent:weight pairs, each latent below --d_sae {sae_cfg.d_sae} once, e.g. 3:0,17:4")


def latent_weights(text: str, d_sae: int) -> list[float]:
    """w_i in D(y) of each latent from --fpo_latent_weights, 1 where it names none; [] unless it is
    latent:weight pairs, latents below d_sae and distinct: ('1:0,3:4.5', 5) -> [1, 0, 1, 4.5, 1]."""
    pairs = [re.fullmatch(r"(\d+):(\d+(\.\d+)?)", pair) for pair in text.split(",")] if text else []
    named = {int(pair[1]): float(pair[2]) for pair in pairs if pair and int(pair[1]) < d_sae}
    return [named.get(latent, 1.0) for latent in range(d_sae)] if len(named) == len(pairs) else []


# ----------------------------------------------------------------------------------------------
# What an artifact was made with: saved beside it, compared on --resume and on reuse.


def stage_settings(cfg: Config, stage: str, seed: int | None = None) -> dict:
    """The flags that decide a stage's result: saved with its output and its resume file."""
    section = {"pretrain": cfg.pretrain, "sae": cfg.sae, "prefer": cfg.prefer}[stage]
    file_flag = "preference_file" if stage == "prefer" else "corpus_file"
    files = {file_flag: getattr(cfg.run, file_flag)}
    return asdict(section) | files | {"seed": cfg.run.seed if seed is None else seed}


def settings_section(section_type: type, settings: dict):
    """A config section from a checkpoint's saved `stage_settings`, without the extra keys."""
    fields = section_type.__dataclass_fields__
    return section_type(**{key: value for key, value in settings.items() if key in fields})
