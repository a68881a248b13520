"""The experiments' command line: `python -m experiments --<experiment>` with any flag of
`python train.py`; experiments/README.md has every command and what it writes.

    --sweep         every method tuned alike on validation prompts (sweep.py)
    --compare       every method at its pick on --seeds other references (compare.py)
    --head_to_head  FPO judged against each method, prompt by prompt, at 5 temperatures
    --ablation      FPO with its SAE block, alpha and stop-gradient, or k changed (paper.py)
    --control       FPO with weights w_i in D(y) on the sentiment, topic or random latents
    --bound         per-token KL against the change of the SAE codes; D(y) against SeqKL(y)
    --bench         step times on identical batches, and each training loop's memory (bench.py)
"""

import contextlib
import math
from pathlib import Path

import data
import train
from config import parse_args, run_command
from experiments.bench import bench
from experiments.common import (
    Stopped, check_compare_policies, check_reference_dir, read_compare, reference_dir, threads_of,
)
from experiments.compare import checked_picks, compare, head_to_head, picks_path
from experiments.paper import (
    CONTROL_LATENTS, ablation, ablation_rows, bound, control, is_default,
)
from experiments.settings import (
    EXPERIMENTS, LabConfig, check_experiment_flags, compare_seeds, sweep_seeds,
)
from experiments.sweep import judged_every, sweep
from runtime import UsageError, out_dir_lock


def main(argv: list[str]) -> None:
    """Parse and check every flag and input, then run the one experiment asked for under the
    lock of out_dir and of each reference directory it uses."""
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
    seeds = check_experiment(cfg, chosen[0])
    device = train.start_run(cfg)
    # The references' directories are locked too: `python train.py --out_dir out/ref_seed1337`
    # would otherwise rebuild a cache an experiment is reading.
    with out_dir_lock(cfg.run.out_dir), contextlib.ExitStack() as references:
        for seed in seeds:
            references.enter_context(out_dir_lock(str(reference_dir(cfg, seed))))
        try:
            run[chosen[0]](cfg, device)
        except KeyboardInterrupt:  # outside any training loop (those save and say so themselves)
            again = "the same command with --resume" if chosen[0] == "compare" else "it again"
            raise Stopped(f"--{chosen[0]} interrupted (Ctrl-C); the runs that finished are "
                          f"saved: run {again} to continue") from None


def check_experiment(cfg: LabConfig, experiment: str) -> list[int]:
    """Refuse, before any work, what an experiment would fail at or silently get wrong later;
    return the seeds of the references it uses."""
    judged = ("sweep", "compare", "head_to_head", "ablation", "control")
    picks = cfg.experiment.picks
    if experiment in judged and cfg.run.preference_file:
        raise UsageError(
            f"--{experiment} judges sampled responses, and the judge knows only the toy world: "
            "drop --preference_file (--bench and `python train.py` take it)"
        )
    if picks and experiment != "compare":
        raise UsageError(f"--picks: only --compare runs picks, not --{experiment}")
    if picks and not Path(picks).exists():
        raise UsageError(
            f"--picks {picks}: no such file (docs/sweep_picks.json holds the picks the docs' "
            "tables were made with)"
        )
    seeds = {
        "sweep": sweep_seeds,
        "compare": compare_seeds,
        "ablation": compare_seeds,
        "control": compare_seeds,
        "bench": lambda cfg: [cfg.run.seed],
    }
    if experiment in ("head_to_head", "bound"):  # compare's references, as compare.json has them
        compare_json = read_compare(cfg)
        check_compare_policies(cfg, compare_json)
        used = sorted({row["seed"] for row in compare_json["rows"]})
    else:
        used = seeds[experiment](cfg)
    for seed in used:
        check_reference_dir(reference_dir(cfg, seed), threads_of(cfg))
    # picks that record their references are checked against them (checked_picks)
    tuned_recorded = experiment == "compare" and picks_path(cfg).exists() and checked_picks(cfg)[2]
    if experiment in ("sweep", "compare") and not tuned_recorded:
        tuned_on = sweep_seeds(cfg)
        judged_on = compare_seeds(cfg)
        if set(tuned_on) & set(judged_on):
            raise UsageError(
                f"--seed {cfg.run.seed}: --compare's references (seeds {judged_on[0]}-"
                f"{judged_on[-1]}) overlap --sweep's (seeds {tuned_on[0]}-{tuned_on[-1]}), so "
                "picks would be judged on a reference they were tuned on; move --seed or "
                "--sweep_seed"
            )
    if experiment == "ablation":
        check_ablation(cfg)
    if experiment == "control" and cfg.prefer.fpo_latent_weights:
        raise UsageError(
            f"--fpo_latent_weights {cfg.prefer.fpo_latent_weights}: --control sets the weights "
            "itself, against FPO with every weight 1; drop the flag"
        )
    if experiment == "control" and cfg.sae.d_sae < CONTROL_LATENTS:
        raise UsageError(
            f"--d_sae {cfg.sae.d_sae}: --control weighs sets of {CONTROL_LATENTS} latents, so "
            f"the SAE needs at least {CONTROL_LATENTS}: pass --d_sae {CONTROL_LATENTS} or more"
        )
    if experiment == "sweep":
        check_sweep(cfg)
    return used


def check_sweep(cfg: LabConfig) -> None:
    """--sweep's own limits: the prompts it judges, and judged points that land on its runs' last
    step."""
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


def check_ablation(cfg: LabConfig) -> None:
    """Each ablation table compares its rows with the row at this command's settings: refuse
    settings whose grid would lack that row, or hold a value no flag would take."""
    for table, rows in ablation_rows(cfg).items():
        if not any(is_default(cfg, changed) for changed in rows.values()):
            raise UsageError(
                f"--ablation: its table {table!r} has no row at this run's settings to compare "
                "with; run it at config.py's defaults (drop --alpha, --fpo_k, --sae_layer)"
            )
        for label, changed in rows.items():
            if not all(math.isfinite(value) for value in changed.values()):
                raise UsageError(
                    f"--alpha {cfg.prefer.alpha:g}: --ablation's row {label!r} would train at "
                    f"alpha {changed['alpha']:g}; pass a smaller --alpha, or drop it"
                )


if __name__ == "__main__":
    run_command(main)
