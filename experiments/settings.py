"""The experiments' own flags: one more config section beside the pipeline's, and its checks.

`python -m experiments --compare --seeds 3` sets `LabConfig.experiment.compare` and `.seeds`;
every flag of `python train.py` applies too (`--out_dir`, `--pref_steps`, ...).
"""

from dataclasses import dataclass, field

from config import Config
from runtime import UsageError

MAX_REFERENCES = 100  # each reference is a whole pipeline: a few minutes of training at least
MAX_BENCH_STEPS = 10_000
MAX_WORKERS = 64
SEEDS_BELOW = 2**32  # torch and the toy world take seeds below 2**32


@dataclass
class ExperimentConfig:
    compare: bool = False  # every method at its pick on --seeds references
    seeds: int = 5  # --compare's references: seeds --seed, --seed + 1, ... each a whole pipeline
    picks: str = ""  # --compare: the picks file to run (docs/sweep_picks.json); empty: out_dir's
    sweep: bool = False  # tune every method alike on validation prompts
    sweep_seed: int = 1000  # --sweep's first reference seed (then +1, ...); not --compare's seeds
    sweep_references: int = 3  # how many references (whole pipelines) --sweep tunes on
    head_to_head: bool = False  # FPO judged against each method, at 5 temperatures
    ablation: bool = False  # FPO's SAE block, alpha, stop-gradient or k changed
    control: bool = False  # FPO with weights w_i in D(y) on sentiment, topic or random latents
    bound: bool = False  # per-token KL against SAE-code change; D(y) against SeqKL
    bench: bool = False  # time training steps of each method on identical batches
    bench_steps: int = 50  # timed steps per method in --bench
    workers: int = 1  # runs trained side by side, one process each (use --threads 1 with 2+)


@dataclass
class LabConfig(Config):
    """The pipeline's settings and the experiments'; `python -m experiments --help` lists them."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)


EXPERIMENTS = ("sweep", "compare", "head_to_head", "ablation", "control", "bound", "bench")


def check_experiment_flags(cfg: LabConfig) -> None:
    """Refuse, as config.check_config does for the pipeline's flags, an experiment flag out of
    range: a count of references that would never finish (or exhaust memory listing its seeds),
    or seeds past 2**32."""
    lab = cfg.experiment

    def require(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise UsageError(f"--{name} {getattr(lab, name)!r}: must be {allowed}")

    for name in ("seeds", "sweep_references", "bench_steps", "workers"):
        require(name, getattr(lab, name) > 0, "> 0")
    require("sweep_seed", lab.sweep_seed >= 0, ">= 0")
    require("sweep_seed", lab.sweep_seed < SEEDS_BELOW, "below 2**32")
    require("seeds", lab.seeds <= MAX_REFERENCES, f"at most {MAX_REFERENCES}")
    require("sweep_references", lab.sweep_references <= MAX_REFERENCES, f"at most {MAX_REFERENCES}")
    require("bench_steps", lab.bench_steps <= MAX_BENCH_STEPS, f"at most {MAX_BENCH_STEPS}")
    require("workers", lab.workers <= MAX_WORKERS, f"at most {MAX_WORKERS}")
    # the last reference's seed, too, must be a seed
    room = SEEDS_BELOW - cfg.run.seed
    require("seeds", lab.seeds <= room, f"at most {room} with --seed {cfg.run.seed}")
    room = SEEDS_BELOW - lab.sweep_seed
    require("sweep_references", lab.sweep_references <= room,
            f"at most {room} with --sweep_seed {lab.sweep_seed}")


def compare_seeds(cfg: LabConfig) -> list[int]:
    """--compare's references, which the ablation and control share: --seed, --seed + 1, ..."""
    return list(range(cfg.run.seed, cfg.run.seed + cfg.experiment.seeds))


def sweep_seeds(cfg: LabConfig) -> list[int]:
    """--sweep's references: --sweep_seed, --sweep_seed + 1, ..."""
    return list(range(cfg.experiment.sweep_seed,
                      cfg.experiment.sweep_seed + cfg.experiment.sweep_references))
