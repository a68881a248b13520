"""--sweep: every method tuned alike on validation prompts; its robust pick; the reward-KL
frontier and the over-optimisation curves.

On each of --sweep_references references (seeds --sweep_seed, +1, ...; none of --compare's), every
method trains at each setting of its grid for twice --pref_steps and is judged on the validation
prompts at every third of --pref_steps, until its text falls below the validity floor. Writes
sweep_picks.json (what --compare runs), sweep.md, frontier.svg, validity.svg and win_rate.svg.
"""

import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

import train
from config import Config, stage_settings
from evaluate import judge_against_reference
from experiments import figures, report
from experiments.common import (
    data_settings, frozen_reference, reference_samples, references_and_runs, saved_run,
    train_policy, with_method,
)
from experiments.settings import sweep_seeds
from runtime import write_json, write_text

# Every method gets the same budget: 3 learning rates x 3 values of its other knob = 9 runs on
# each reference, each judged at 6 points along twice --pref_steps, so the pick also chooses when
# to stop. Each grid is centred on where its method's pick landed in an earlier, wider sweep
# (102 settings, extended in rounds wherever a pick sat on an edge), one step of the grid's own
# factor either side: 3x for pref_lr, 4x for alpha, 2x-2.5x for beta, 1 for SimPO's gamma.
# beta is on the scale of each method's log-probs: summed for DPO and TDPO, averaged (about 15x
# smaller) for FPO and SimPO. FPO's D(y) scales with the SAE's activations, so its alpha is far
# from the paper's. FPO-KL's SeqKL is in nats summed over the response, so its alphas are
# smaller. DPO (offline cache) computes DPO's loss (tests check they are equal), so it takes
# DPO's pick rather than training the same runs twice.
SWEEP_GRIDS = {  # label: (the 3 pref_lr, the 3 settings of the other knobs)
    "FPO": ((2e-5, 6e-5, 1.8e-4),
            [{"method": "fpo", "beta": 1.0, "alpha": alpha} for alpha in (64.0, 256.0, 1024.0)]),
    "FPO (alpha=0)": ((2.2e-6, 6.7e-6, 2e-5),
                      [{"method": "fpo", "beta": beta, "alpha": 0.0} for beta in (0.5, 1.0, 2.0)]),
    "FPO-KL": ((1.8e-4, 5.4e-4, 1.6e-3),
               [{"method": "fpo_kl", "beta": 2.0, "alpha": alpha} for alpha in (0.04, 0.16, 0.64)]),
    "DPO": ((6.7e-6, 2e-5, 6e-5), [{"method": "dpo", "beta": beta} for beta in (0.02, 0.05, 0.1)]),
    "SimPO": ((6.7e-6, 2e-5, 6e-5),
              [{"method": "simpo", "beta": 2.0, "gamma": gamma} for gamma in (1.5, 2.5, 3.5)]),
    "TDPO-1": ((6.7e-6, 2e-5, 6e-5),
               [{"method": "tdpo1", "beta": beta} for beta in (0.02, 0.05, 0.1)]),
    "TDPO-2": ((1.8e-4, 5.4e-4, 1.6e-3),
               [{"method": "tdpo2", "beta": 0.1, "alpha": alpha} for alpha in (0.5, 2.0, 8.0)]),
}
VALIDITY_FLOOR = 0.9  # a pick must keep this share of each reference's own valid rate
MATCHED_KL = "FPO at TDPO-2's KL"  # a second pick of FPO's, nearest TDPO-2's pick in KL
POINT_KEYS = {
    "judge_score": ("policy", "judge_score"),
    "valid_rate": ("policy", "valid_rate"),
    "kl_from_reference": ("policy", "kl_from_reference"),
    "win_rate": ("win_rate",),
}


def judged_every(pref_steps: int) -> int:
    """How many steps apart --sweep judges each run: a third of --pref_steps."""
    return max(1, pref_steps // 3)


def sweep_tag(overrides: dict) -> str:
    parts = [
        f"{key}{value:g}" if isinstance(value, float) else str(value)
        for key, value in overrides.items()
    ]
    return "sweep_" + "_".join(parts)


def recipe(cfg: Config) -> dict:
    """What a pick is tuned for, whichever seeds made the references: every stage's settings
    but the seed and the knobs the sweep tunes, the data's, and the judging's but the split."""
    tuned = {"seed", "method", "beta", "alpha", "gamma", "pref_lr", "pref_steps"}
    return {
        name: {key: value for key, value in settings.items() if key not in tuned}
        for name, settings in (
            ("pretraining", stage_settings(cfg, "pretrain")),
            ("SAE training", stage_settings(cfg, "sae")),
            ("preference training", stage_settings(cfg, "prefer")),
            ("data", data_settings(cfg)),
            ("judging", dataclasses.asdict(cfg.eval) | {"eval_split": ""}),
        )
    }


def sweep(cfg: Config, device) -> None:
    """On each of --sweep_references references (whole pipelines of their own seeds, none of
    --compare's), train every method at each setting of its grid for twice --pref_steps and judge
    the validation prompts every third of --pref_steps, stopping a run at its first point below
    the validity floor. Pick per method the (setting, length) by the robust rule of
    pick_setting. Finished runs made from the same inputs are skipped on a rerun. Writes
    sweep_picks.json (what --compare runs, with the recipe it was tuned for), sweep.md and three
    SVGs."""
    out = Path(cfg.run.out_dir)
    every = judged_every(cfg.prefer.pref_steps)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, eval_split="validation"))
    grid = sweep_grid()
    seeds = sweep_seeds(cfg)
    print(f"\n== sweep: {len(grid)} runs of {2 * cfg.prefer.pref_steps} steps on each of "
          f"{len(seeds)} references (seeds {seeds[0]}-{seeds[-1]}), judged every {every} steps "
          "on validation prompts ==")
    started = time.time()

    def runs_of(ref_cfg: Config, made_from: dict) -> list[tuple]:
        # A finished run counts only for this reference's GPT and SAE, the data, its training
        # settings and the judging.
        made_from = made_from | {"eval": dataclasses.asdict(cfg.eval)}
        return [(f"{sweep_tag(overrides)} on reference {ref_cfg.run.seed}", sweep_run, ref_cfg,
                 device, made_from, label, overrides) for label, overrides in grid]

    runs = {  # seed: {tag: run}
        ref_cfg.run.seed: {run["tag"]: run for run in ref_runs}
        for (ref_cfg, _), ref_runs in references_and_runs(cfg, seeds, device, runs_of)
    }
    # seed: the reference's judged validation numbers
    references = {seed: next(iter(runs[seed].values()))["reference"] for seed in seeds}
    grid_runs = {
        label: {
            seed: [runs[seed][sweep_tag(overrides)] for run_label, overrides in grid
                   if run_label == label]
            for seed in seeds
        }
        for label in SWEEP_GRIDS
    }
    reference_valid = {seed: reference["valid_rate"] for seed, reference in references.items()}
    picks = {
        label: pick_setting(runs_by_seed, reference_valid)
        for label, runs_by_seed in grid_runs.items()
    }
    if "FPO" in picks and "TDPO-2" in picks:  # like for like: FPO's point nearest TDPO-2's KL
        picks[MATCHED_KL] = pick_at_kl(grid_runs["FPO"], reference_valid, picks["TDPO-2"])
    for label, pick in picks.items():
        method_grid = [overrides for run_label, overrides in grid
                       if run_label == label or (label == MATCHED_KL and run_label == "FPO")]
        pick["edges"] = grid_edges(pick["settings"], method_grid, every, cfg.prefer)
        pick["settings_tried"] = len(method_grid)
    write_json(out / "sweep_picks.json",
               {"made_from": recipe(cfg), "picks": picks, "threads": torch.get_num_threads()})
    sweep_md = report.sweep_report(picks, references, VALIDITY_FLOOR)
    write_text(out / "sweep.md", sweep_md)
    write_sweep_charts(out, grid_runs, picks)
    print("\n" + sweep_md + f"\nsweep: wrote {out / 'sweep_picks.json'}, {out / 'sweep.md'} "
          f"and frontier.svg, validity.svg, win_rate.svg in {out} | "
          f"{(time.time() - started) / 60:.1f} min")


def sweep_run(ref_cfg: Config, device, made_from: dict, label: str, overrides: dict) -> dict:
    """One grid run on one reference, judged at every third of --pref_steps up to twice it, and
    stopped at its first point below VALIDITY_FLOOR x the reference's valid rate: no later point
    can be picked (fluent_points). A finished one saved from the same inputs is read back
    instead."""
    out = Path(ref_cfg.run.out_dir)
    every = judged_every(ref_cfg.prefer.pref_steps)
    tag = sweep_tag(overrides)
    path = out / f"{tag}_results.json"
    run_cfg = with_method(ref_cfg, overrides | {"pref_steps": 2 * ref_cfg.prefer.pref_steps})
    run_made_from = made_from | {"settings": stage_settings(run_cfg, "prefer")}
    saved = saved_run(path, run_made_from)
    if saved is not None:
        return saved | {"points": fluent_points(saved["points"], saved["reference"])}
    seed = ref_cfg.run.seed
    print(f"sweep: seed {seed}, {label}, {overrides}", flush=True)
    # Judged as train.evaluate_policy judges, without the held-out accuracy no pick reads, and
    # with the reference and the pairs loaded once for all the run's points.
    reference, inputs = frozen_reference(run_cfg, device)
    prompt_texts, judged = train.held_out_prompts(run_cfg, inputs)
    points = []
    judged_reference = {}

    def judge(step: int, policy) -> bool:
        results = judge_against_reference(policy, reference, prompt_texts, judged, inputs.enc,
                                          run_cfg.eval, seed, device, reference_samples(run_cfg))
        point = {"step": step} | {key: report.nested(results, key_path)
                                  for key, key_path in POINT_KEYS.items()}
        points.append(point)
        judged_reference.update(results["reference"])
        if fell_below_floor(point, judged_reference):
            print(f"sweep: {tag} fell below the validity floor at step {step} (valid rate "
                  f"{point['valid_rate']:.3f}, the reference's {judged_reference['valid_rate']:.3f}"
                  f" x {VALIDITY_FLOOR}): no later step is trained", flush=True)
            return False
        return True

    train_policy(run_cfg, device, seed, tag, judge_every=every, judge=judge)
    run = {
        "label": label,
        "tag": tag,
        "overrides": overrides,
        "points": points,
        "reference": judged_reference,
        "made_from": run_made_from,
        "cpu_threads": torch.get_num_threads(),
    }
    write_json(path, run)
    return run


def fluent_points(points: list[dict], reference: dict) -> list[dict]:
    """A run's judged points up to and including its first below VALIDITY_FLOOR x the
    reference's valid rate. Past that point the policy has fallen into invalid text; a pick needs
    a point fluent on every reference, and one that stayed fluent all the way there, so the
    sweep stops the run (and a run saved whole is read as if it had stopped)."""
    for i, point in enumerate(points):
        if fell_below_floor(point, reference):
            return points[:i + 1]
    return points


def fell_below_floor(point: dict, reference: dict) -> bool:
    """Whether a judged point's valid rate is below VALIDITY_FLOOR x the reference's."""
    return point["valid_rate"] < VALIDITY_FLOOR * reference["valid_rate"]


def pick_setting(runs_by_seed: dict[int, list[dict]], reference_valid: dict[int, float]) -> dict:
    """The robust pick of one method over the references: among the (setting, length) points
    whose valid rate is at least VALIDITY_FLOOR x each reference's own on every reference, the
    one with the highest worst-case judge score over the references; if no point is, the one
    whose worst validity, relative to that floor, is highest. runs_by_seed: {seed: that
    reference's runs of the method}. The pick's `validation` holds its point on every reference
    (by seed), and `run` the tag of its runs."""
    candidates = grid_points(runs_by_seed)
    fluent = [c for c in candidates if validity_margin(c, reference_valid) >= 0]
    if fluent:
        return max(fluent, key=lambda c: min(p["judge_score"] for p in c["validation"].values()))
    return max(candidates, key=lambda c: validity_margin(c, reference_valid))


def pick_at_kl(
    runs_by_seed: dict[int, list[dict]], reference_valid: dict[int, float], target: dict
) -> dict:
    """Among one method's fluent grid points (as in pick_setting), the one whose KL from the
    reference, averaged over the references, is nearest (on a log scale) to the `target` pick's:
    the method compared with another at the same distance from the reference."""
    def mean_kl(candidate: dict) -> float:
        return statistics.fmean(p["kl_from_reference"] for p in candidate["validation"].values())

    candidates = grid_points(runs_by_seed)
    fluent = [c for c in candidates if validity_margin(c, reference_valid) >= 0] or candidates
    target_kl = mean_kl(target)
    return min(fluent, key=lambda c: abs(math.log(max(mean_kl(c), 1e-6) / max(target_kl, 1e-6))))


def grid_points(runs_by_seed: dict[int, list[dict]]) -> list[dict]:
    """Every (setting, length) of one method's runs judged on every reference (a run stopped
    on one has no later points there), with its point on each."""
    candidates = {}
    for seed, runs in runs_by_seed.items():
        for run in runs:
            for point in run["points"]:
                candidate = candidates.setdefault((run["tag"], point["step"]), {
                    "settings": run["overrides"] | {"pref_steps": point["step"]},
                    "validation": {},
                    "run": run["tag"],
                })
                candidate["validation"][str(seed)] = point
    return [c for c in candidates.values() if len(c["validation"]) == len(runs_by_seed)]


def validity_margin(candidate: dict, reference_valid: dict[int, float]) -> float:
    """How far the point's valid rate stays above VALIDITY_FLOOR x the reference's own, at worst
    over the references (negative: below it on some reference)."""
    return min(
        point["valid_rate"] - VALIDITY_FLOOR * reference_valid[int(seed)]
        for seed, point in candidate["validation"].items()
    )


def sweep_grid() -> list[tuple[str, dict]]:
    """Every (method label, overrides) the sweep trains: each method's knobs x its pref_lr."""
    return [
        (label, knobs | {"pref_lr": lr})
        for label, (learning_rates, all_knobs) in SWEEP_GRIDS.items()
        for knobs in all_knobs
        for lr in learning_rates
    ]


def grid_edges(settings: dict, method_grid: list[dict], every: int, pref_cfg) -> list[str]:
    """Where a pick sits on an edge of its method's grid (a list of overrides): for each knob
    (pref_lr, beta, alpha, gamma), along the grid's line through the pick (its other knobs held),
    the smallest or largest of two or more values; or the first or last judged step."""
    knobs = [key for key in method_grid[0] if key != "method"]
    edges = []
    for key in knobs:
        values = [
            overrides[key] for overrides in method_grid
            if all(overrides[other] == settings[other] for other in knobs if other != key)
        ]
        if len(set(values)) > 1 and settings[key] in (min(values), max(values)):
            edges.append(f"{'smallest' if settings[key] == min(values) else 'largest'} {key}")
    if settings["pref_steps"] == every:
        edges.append("first judged step")
    if settings["pref_steps"] == 2 * pref_cfg.pref_steps:
        edges.append("last judged step")
    return edges


def write_sweep_charts(out: Path, grid_runs: dict, picks: dict) -> None:
    """frontier.svg: judge score against KL at every point of every grid run; validity.svg and
    win_rate.svg: along the picked setting's runs of each method. Each point is the mean over the
    references with their range, at the steps judged on all of them (a run stops below the
    validity floor), and sweep_points.md holds every number drawn."""
    def across(runs: list[dict], key: str) -> list[tuple[int, tuple[float, float, float]]]:
        """(step, (mean, min, max)) of one setting's runs, one per reference, step by step."""
        return [
            (same_step[0]["step"], (statistics.fmean(values), min(values), max(values)))
            for same_step in zip(*(run["points"] for run in runs))
            for values in [[point[key] for point in same_step]]
        ]

    def runs_of(runs_by_seed: dict, tag: str) -> list[dict]:  # one run per reference
        return [run for runs in runs_by_seed.values() for run in runs if run["tag"] == tag]

    n_references = len(next(iter(grid_runs.values())))
    frontier = {}  # label: [{"setting", "steps", "kl", "judge"}, ...]
    for label, runs_by_seed in grid_runs.items():
        frontier[label] = []
        for run in next(iter(runs_by_seed.values())):
            same = runs_of(runs_by_seed, run["tag"])
            setting = ", ".join(f"{key} {value:g}" for key, value in run["overrides"].items()
                                if key != "method")
            for (step, kl), (_, judge) in zip(across(same, "kl_from_reference"),
                                              across(same, "judge_score")):
                frontier[label].append({"setting": setting, "steps": step, "kl": kl,
                                        "judge": judge})
    along = {  # key: {label: [(step, mean, (min, max)), ...]} at each method's pick
        key: {
            label: [(step, mean, (low, high)) for step, (mean, low, high)
                    in across(runs_of(grid_runs[label], pick["run"]), key)]
            for label, pick in picks.items()
            if label in grid_runs  # not MATCHED_KL, a second pick of FPO's
        }
        for key in ("valid_rate", "win_rate")
    }
    write_text(out / "sweep_points.md", report.sweep_points(frontier, along, n_references))
    figures.save(figures.frontier(frontier, n_references), out / "frontier.svg")
    for key, name, quantity in (("valid_rate", "validity", "valid rate"),
                                ("win_rate", "win_rate", "win rate over the reference")):
        figures.save(figures.along_training(along[key], quantity, n_references),
                     out / f"{name}.svg")
