"""The experiments' command line: `python -m experiments --<experiment>` with any flag of
`python train.py`; experiments/README.md has every command and what it writes.

    --sweep         every method tuned alike on validation prompts (sweep.py)
    --compare       every method at its pick on --seeds other references (compare.py)
    --head_to_head  FPO judged against each method, prompt by prompt, at 5 temperatures
    --ablation      FPO with its SAE block, alpha and stop-gradient, or k changed (paper.py)
    --control       FPO's constraint on the sentiment or topic latents only
    --bound         per-token KL against the change of the SAE codes; D(y) against SeqKL(y)
    --bench         step times on identical batches, and each training loop's memory (bench.py)
"""

from pathlib import Path

import data
import train
from config import parse_args, run_command
from experiments.bench import bench
from experiments.compare import compare, head_to_head
from experiments.paper import ablation, bound, control
from experiments.settings import (
    EXPERIMENTS, LabConfig, check_experiment_flags, compare_seeds, sweep_seeds,
)
from experiments.sweep import judged_every, sweep
from runtime import UsageError, out_dir_lock


def main(argv: list[str]) -> None:
    """Parse and check every flag, then run the one experiment asked for under out_dir's lock."""
    cfg = parse_args(
        argv, description=__doc__.split("\n\n")[0], prog="-m experiments", config_type=LabConfig
    )
    check_experiment_flags(cfg)
    run = {
        "sweep": sweep,
        "compare": compare,
        "head_to_head": head_to_head,
        "ablation": ablation,
        "control": control,
        "bound": bound,
        "bench": bench,
    }
    chosen = [name for name in EXPERIMENTS if getattr(cfg.experiment, name)]
    if len(chosen) != 1:
        raise UsageError(
            "pick one experiment: --sweep, --compare, --head_to_head, --ablation, --control, "
            "--bound or --bench"
        )
    check_experiment(cfg, chosen[0])
    device = train.start_run(cfg)
    with out_dir_lock(cfg.run.out_dir):
        run[chosen[0]](cfg, device)


def check_experiment(cfg: LabConfig, experiment: str) -> None:
    """Refuse, before any work, what an experiment would fail at or silently get wrong later."""
    judged = ("sweep", "compare", "head_to_head", "ablation", "control")
    picks = cfg.experiment.picks
    if experiment in judged and cfg.run.preference_file:
        raise UsageError(
            f"--{experiment} judges sampled responses, and the judge knows only the toy world: "
            "drop --preference_file (--bench and `python train.py` take it)"
        )
    if picks and experiment != "compare":
        raise UsageError(f"--picks: only --compare runs picks, not --{experiment}")
    if picks and not Path(picks).is_file():
        raise UsageError(
            f"--picks {picks}: no such file (docs/sweep_picks.json holds the picks the docs' "
            "tables were made with)"
        )
    if experiment in ("sweep", "compare"):
        tuned_on = sweep_seeds(cfg)
        judged_on = compare_seeds(cfg)
        if set(tuned_on) & set(judged_on):
            raise UsageError(
                f"--seed {cfg.run.seed}: --compare's references (seeds {judged_on[0]}-"
                f"{judged_on[-1]}) overlap --sweep's (seeds {tuned_on[0]}-{tuned_on[-1]}), so "
                "picks would be judged on a reference they were tuned on; move --seed or "
                "--sweep_seed"
            )
    if experiment != "sweep":
        return
    n_prompts = len(data.split_prompts("validation"))
    if cfg.eval.n_eval_prompts > n_prompts:
        raise UsageError(
            f"--n_eval_prompts {cfg.eval.n_eval_prompts}: must be at most {n_prompts} with "
            "--sweep (the validation split's distinct prompts, which it judges)"
        )
    pref_steps = cfg.prefer.pref_steps
    every = judged_every(pref_steps)
    if 2 * pref_steps % every:
        raise UsageError(
            f"--pref_steps {pref_steps}: --sweep judges every {every} steps (a third of it), so "
            f"no judged point falls on its runs' last step, {2 * pref_steps}; pick a multiple "
            f"of 3, such as {3 * round(pref_steps / 3)}"
        )


if __name__ == "__main__":
    run_command(main)
