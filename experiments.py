"""The evidence: FPO against its baselines, each tuned alike. Nothing imports this file.

    python experiments.py --sweep         every method at 9 settings of its own knobs on each of
                                          3 references, judged on the validation prompts along
                                          twice the default length; each method's robust pick;
                                          the reward-KL frontier and over-optimisation curves
    python experiments.py --compare       every method at its pick (or COMPARE_ROWS without a
                                          sweep) on 5 other references: one table, each
                                          reference's numbers, paired differences from FPO
    python experiments.py --head_to_head  FPO judged against each method, prompt by prompt, at 5
                                          temperatures, from --compare's policies
    python experiments.py --ablation      FPO with its SAE block, alpha and stop-gradient, or k
                                          changed, on --compare's references
    python experiments.py --control       FPO's constraint on the sentiment or topic latents only
    python experiments.py --bound         per-token KL against the change of the SAE codes (the
                                          paper's bound), and D(y) against SeqKL(y)
    python experiments.py --bench         step times on identical batches, and each training
                                          loop's peak memory

A reference is one seed's whole pipeline: its own corpus, pretrained GPT, SAE, cache and pairs,
made once in out_dir/ref_seed<seed>/ and shared by every experiment, so the picks and the
intervals see how much the reference itself varies. Every flag of `python train.py` applies
(`--out_dir`, `--pref_steps`, ...). Each training run of --compare and --bench happens in a
child process, so its memory is its own. Each JSON file records what it was made from
(made_from: the GPT, the SAE, the data, the judging and training settings); a rerun, or
`--resume`, reuses a saved run only if all of it matches.
"""

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
import report
import train
from config import Config, parse_args, run_command, stage_settings
from evaluate import (
    attribute_latents, bootstrap_mean, bootstrap_spearman, bound_constant, bound_terms,
    encode_prompts, judge_stats, paired_difference, sample_responses, win_rate,
)
from model import GPT
from runtime import (
    UsageError, autocast, batch_indices, changed_settings, check_made_from, load_checkpoint,
    out_dir_lock, read_json, synchronize, write_atomically, write_json, write_text,
)

# Per-method settings for --bench, and for --compare without a --sweep: FPO at the defaults (from
# its sweep grid), the baselines as in their papers. beta is on the scale of each method's
# log-probs: summed for DPO and TDPO, averaged (about 15x smaller here) for FPO and SimPO.
COMPARE_ROWS = {
    "FPO": {"method": "fpo", "beta": 2.0, "alpha": 16.0},
    "FPO (alpha=0)": {"method": "fpo", "beta": 2.0, "alpha": 0.0},
    "FPO-KL": {"method": "fpo_kl", "beta": 2.0, "alpha": 0.5},  # untuned: the paper's alpha
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
    "reward acc (own)": (("reward_accuracy",), 3),
    "reward acc (DPO)": (("implicit_reward_accuracy",), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
    "entropy": (("policy", "entropy_per_token"), 3),
    "distinct-2": (("policy", "distinct_2"), 3),
    "length": (("policy", "mean_length"), 1),
    "feature drift": (("feature_drift",), 4),
    "ms/step": (("median_step_ms",), 1),
}


def with_method(cfg: Config, overrides: dict) -> Config:
    """cfg with one COMPARE_ROWS entry's preference settings."""
    return dataclasses.replace(cfg, prefer=dataclasses.replace(cfg.prefer, **overrides))


def compare_tag(label: str, seed: int) -> str:
    return "compare_" + re.sub(r"\W+", "_", label.lower()).strip("_") + f"_seed{seed}"


def reference_run(cfg: Config, seed: int, device) -> Config:
    """cfg for one seed's whole pipeline. Each seed has its own directory,
    out_dir/ref_seed<seed>/: its reference GPT and SAE are pretrained there once (the stage
    already done is skipped, so an interrupted experiment resumes) and shared by every
    experiment; every run trained from them is saved beside them. A GPT or SAE there made with
    other settings is refused, never silently reused. What runs are made from: inputs_made_from.
    """
    ref_dir = Path(cfg.run.out_dir) / f"ref_seed{seed}"
    ref_cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, seed=seed, out_dir=str(ref_dir))
    )
    make_once(ref_cfg, "pretrain", device)
    make_once(ref_cfg, "sae", device)
    return ref_cfg


def make_once(cfg: Config, stage: str, device) -> None:
    """Make out_dir's gpt.pt (stage pretrain) or sae.pt (stage sae) unless it is there. One made
    with other settings is refused, never silently reused or overwritten."""
    ref_dir = Path(cfg.run.out_dir)
    name = {"pretrain": "gpt.pt", "sae": "sae.pt"}[stage]
    if not (ref_dir / name).exists():
        {"pretrain": train.pretrain, "sae": train.train_sae_stage}[stage](cfg, device)
        return
    saved = load_checkpoint(ref_dir / name, name.removesuffix(".pt"), "")["config"]
    shown = changed_settings(saved, stage_settings(cfg, stage))
    if shown:
        raise UsageError(
            f"{ref_dir / name} was made with {shown}, not this run's settings: delete {ref_dir} "
            "to make it anew, or pass another --out_dir"
        )


def data_settings(cfg: Config) -> dict:
    """The preference pairs a run trains and is judged on: the user's file (by its contents), or
    the toy world's, which its settings make."""
    if cfg.run.preference_file:
        contents = Path(cfg.run.preference_file).read_bytes()
        return {
            "preference_file": cfg.run.preference_file,
            "sha256": hashlib.sha256(contents).hexdigest(),
            "skip_bad_rows": cfg.run.skip_bad_rows,
            "n_test_pairs": cfg.prefer.n_test_pairs,
        }
    return {"n_pairs": cfg.prefer.n_pairs, "n_test_pairs": cfg.prefer.n_test_pairs,
            "seed": cfg.run.seed}


def inputs_made_from(cfg: Config, device) -> dict:
    """What every run of an experiment starts from: the reference GPT and the SAE (fingerprints
    of their weights) and the data. Each artifact adds the settings it was made with."""
    gpt_fingerprint = train.load_gpt(cfg, device)[1]
    return {
        "GPT": gpt_fingerprint,
        "SAE": train.load_trained_sae(cfg, gpt_fingerprint, device)[1],
        "data": data_settings(cfg),
    }


def saved_run(path: Path, made_from: dict) -> dict | None:
    """The results a finished run saved at `path`, if it was made from exactly `made_from`; else
    None, with the reason, and the run is done again: the file is only a cache of that run."""
    if not path.exists():
        return None
    try:
        saved = read_json(path, how_to_make="")
    except UsageError:  # truncated (a crash mid-write, before writes were atomic) or not JSON
        print(f"{path} is not readable JSON; running it again")
        return None
    recorded = saved.get("made_from") if isinstance(saved, dict) else None
    if recorded == made_from:
        return saved
    recorded = recorded if isinstance(recorded, dict) else {}
    changed = [name for name in made_from | recorded if recorded.get(name) != made_from.get(name)]
    print(f"{path} was made from another {' and '.join(changed)}; running it again")
    return None


def in_child_process(function, *args):
    """Run function(*args) in a fresh process and return its result, so peak memory is the
    method's own and nothing (allocator state, caches) leaks from one method to the next. The
    child uses this process's CPU thread count (--threads), which decides how reductions round.

    However the child stops, this process hears of it: the child's exception comes back pickled;
    a child killed outright (SIGKILL, the out-of-memory killer) raises BrokenProcessPool. Ctrl-C
    here is passed on to the child, whose training loop stops at a step boundary, saves and
    raises Interrupted; this process waits for that rather than dying first. The child ends
    itself when this process is gone."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=context,
        initializer=start_child,
        initargs=(torch.get_num_threads(), os.getpid()),
    ) as pool:
        child = pool.submit(os.getpid).result()
        ctrl_c = threading.Event()

        def pass_on_ctrl_c(signum, frame):
            ctrl_c.set()
            # even when a terminal's Ctrl-C reached the child too: its loop just notes a request
            with contextlib.suppress(ProcessLookupError):  # the child has just finished
                os.kill(child, signal.SIGINT)

        previous = signal.signal(signal.SIGINT, pass_on_ctrl_c)
        try:
            result = pool.submit(function, *args).result()
        except BrokenProcessPool:
            if ctrl_c.is_set():  # killed by its Ctrl-C before its training loop began
                raise KeyboardInterrupt from None
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
    if ctrl_c.is_set():  # the child finished before the Ctrl-C reached its loop: stop here
        raise KeyboardInterrupt
    return result


def start_child(threads: int, parent: int) -> None:
    """The child's first steps: the parent's thread count, and a watch that ends the child once
    the parent is gone (killed outright), as nothing would ever read its result."""
    torch.set_num_threads(threads)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is handed to another parent (init)
        time.sleep(0.1)
    os._exit(1)


def train_in_child(tag: str, to_continue: str, function, *args):
    """in_child_process(function, *args) for the run `tag`, with every way it can fail as one
    `error:` line that names the run and says how to continue (`to_continue`). Interrupted
    (Ctrl-C) passes through: it names the run's resume file and says `--resume`."""
    try:
        return in_child_process(function, *args)
    except BrokenProcessPool:
        raise UsageError(
            f"{tag}: the process training it stopped without a result (killed by a signal, "
            f"perhaps by the out-of-memory killer); {to_continue}"
        ) from None
    except (MemoryError, torch.OutOfMemoryError) as error:
        raise UsageError(
            f"{tag}: out of memory ({type(error).__name__}); lower --pref_batch_size or free "
            f"memory, then {to_continue}"
        ) from None
    except (UsageError, data.DataError) as error:
        raise UsageError(f"{tag}: {error}") from None


# ----------------------------------------------------------------------------------------------
# --sweep: every method tuned alike on validation prompts; the reward-KL frontier;
# over-optimisation

# Every method starts from the same budget: 3 learning rates x 3 settings of its other knobs
# (beta, and gamma for SimPO or alpha for FPO, FPO-KL and TDPO-2; FPO without its constraint,
# alpha 0, has beta alone) = 9 runs on each reference, each judged at 6 points along twice the
# default length, so the pick also chooses when to stop; SWEEP_EXTENSIONS then adds 3 per round
# where a pick sat on an edge. beta is on the scale of each method's log-probs: summed
# for DPO and TDPO, averaged (about 15x smaller) for FPO and SimPO. FPO's D(y) scales with the
# SAE's activations, so its alpha is searched over decades rather than taken from the paper.
# FPO-KL's SeqKL is in nats summed over the response, so its alphas are smaller: its weight on
# SeqKL, alpha x beta, spans 0.08 to 0.64, as TDPO-2's grid spans 0.05 to 0.6. DPO (offline
# cache) computes DPO's loss (tests check they are equal), so it takes DPO's pick rather than
# training the same runs twice.
SWEEP_LRS = (2e-5, 6e-5, 1.8e-4)
SWEEP_KNOBS = {
    "FPO": [
        {"method": "fpo", "beta": beta, "alpha": alpha}
        for beta, alpha in ((2.0, 4.0), (2.0, 16.0), (4.0, 16.0))
    ],
    "FPO (alpha=0)": [{"method": "fpo", "beta": beta, "alpha": 0.0} for beta in (1.0, 2.0, 4.0)],
    "FPO-KL": [
        {"method": "fpo_kl", "beta": beta, "alpha": alpha}
        for beta, alpha in ((2.0, 0.04), (2.0, 0.16), (4.0, 0.16))
    ],
    "DPO": [{"method": "dpo", "beta": beta} for beta in (0.05, 0.1, 0.3)],
    "SimPO": [
        {"method": "simpo", "beta": beta, "gamma": gamma}
        for beta, gamma in ((2.0, 0.5), (2.0, 1.5), (4.0, 1.0))
    ],
    "TDPO-1": [{"method": "tdpo1", "beta": beta} for beta in (0.05, 0.1, 0.3)],
    "TDPO-2": [
        {"method": "tdpo2", "beta": beta, "alpha": alpha}
        for beta, alpha in ((0.1, 0.5), (0.1, 2.0), (0.3, 2.0))
    ],
}
# Settings added where a sweep's pick sat on an edge of its method's grid (grid_edges), 3 per
# method and round, each the pick moved one step past one of its edges (beta, alpha or gamma by
# the grid's own factor, pref_lr by 3x), past two at once, or along a knob the pick's line did not
# vary yet. Round 1 extended every method; rounds 2 to 4 every method still on an edge other
# than the first or last judged step (rounds 3 and 4: FPO alone). FPO without its constraint
# joined at round 2.
SWEEP_EXTENSIONS = {
    "FPO": [
        {"method": "fpo", "beta": beta, "alpha": alpha, "pref_lr": 6e-5}
        for beta, alpha in ((8.0, 16.0), (4.0, 64.0), (8.0, 64.0),  # round 1
                            (2.0, 64.0), (4.0, 256.0), (2.0, 256.0),  # round 2
                            (1.0, 256.0), (2.0, 1024.0), (1.0, 1024.0),  # round 3
                            (0.5, 256.0), (1.0, 64.0), (0.5, 64.0))  # round 4
    ],
    "FPO (alpha=0)": [
        {"method": "fpo", "beta": beta, "alpha": 0.0, "pref_lr": lr}
        for beta, lr in ((0.5, 2e-5), (1.0, 6.7e-6), (0.5, 6.7e-6))  # round 2
    ],
    "FPO-KL": [
        {"method": "fpo_kl", "beta": beta, "alpha": alpha, "pref_lr": lr}
        for beta, alpha, lr in ((1.0, 0.16, 1.8e-4), (2.0, 0.64, 1.8e-4), (2.0, 0.16, 5.4e-4),
                                (2.0, 0.16, 1.6e-3), (2.0, 0.04, 5.4e-4), (2.0, 0.64, 5.4e-4))
    ],
    "DPO": [
        {"method": "dpo", "beta": beta, "pref_lr": lr}
        for beta, lr in ((0.02, 2e-5), (0.05, 6.7e-6), (0.02, 6.7e-6))
    ],
    "SimPO": [
        {"method": "simpo", "beta": 2.0, "gamma": gamma, "pref_lr": lr}
        for gamma, lr in ((2.5, 2e-5), (1.5, 6.7e-6), (2.5, 6.7e-6),
                          (3.5, 2e-5), (2.5, 6e-5), (3.5, 6e-5))
    ],
    "TDPO-1": [
        {"method": "tdpo1", "beta": beta, "pref_lr": lr}
        for beta, lr in ((0.02, 2e-5), (0.05, 6.7e-6), (0.02, 6.7e-6))
    ],
    "TDPO-2": [
        {"method": "tdpo2", "beta": beta, "alpha": alpha, "pref_lr": lr}
        for beta, alpha, lr in ((0.03, 2.0, 1.8e-4), (0.1, 8.0, 1.8e-4), (0.1, 2.0, 5.4e-4),
                                (0.1, 2.0, 1.6e-3), (0.1, 0.5, 5.4e-4), (0.1, 8.0, 5.4e-4))
    ],
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


def sweep_seeds(cfg: Config) -> list[int]:
    return list(range(cfg.run.sweep_seed, cfg.run.sweep_seed + cfg.run.sweep_references))


def compare_seeds(cfg: Config) -> list[int]:
    return list(range(cfg.run.seed, cfg.run.seed + cfg.run.seeds))


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
    the validation prompts every third of --pref_steps. Pick per method the (setting, length)
    by the robust rule of pick_setting. Finished runs made from the same inputs are skipped on a
    rerun. Writes sweep_picks.json (what --compare runs, with the recipe it was tuned for),
    sweep.md and three SVGs."""
    out = Path(cfg.run.out_dir)
    every = judged_every(cfg.prefer.pref_steps)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, eval_split="validation"))
    grid = sweep_grid()
    seeds = sweep_seeds(cfg)
    print(f"\n== sweep: {len(grid)} runs of {2 * cfg.prefer.pref_steps} steps on each of "
          f"{len(seeds)} references (seeds {seeds[0]}-{seeds[-1]}), judged every {every} steps "
          "on validation prompts ==")
    runs = {}  # seed: {tag: run}
    references = {}  # seed: the reference's judged validation numbers
    started = time.time()
    for number, seed in enumerate(seeds, 1):
        print(f"sweep: reference {number}/{len(seeds)} (seed {seed}) | "
              f"{time.time() - started:.0f}s", flush=True)
        ref_cfg = reference_run(cfg, seed, device)
        made_from = inputs_made_from(ref_cfg, device)
        # A finished run counts only for this reference's GPT and SAE, the data, its training
        # settings and the judging.
        made_from |= {"eval": dataclasses.asdict(cfg.eval)}
        reference_samples = {}
        runs[seed] = {}
        for run_number, (label, overrides) in enumerate(grid, 1):
            print(f"sweep: seed {seed}, run {run_number}/{len(grid)} ({label}, {overrides}) | "
                  f"{time.time() - started:.0f}s", flush=True)
            run = sweep_run(ref_cfg, device, made_from, label, overrides, reference_samples)
            runs[seed][run["tag"]] = run
        references[seed] = run["reference"]
    grid_runs = {
        label: {
            seed: [runs[seed][sweep_tag(overrides)] for run_label, overrides in grid
                   if run_label == label]
            for seed in seeds
        }
        for label in SWEEP_KNOBS
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
    write_json(out / "sweep_picks.json", {"made_from": recipe(cfg), "picks": picks})
    sweep_md = report.sweep_report(picks, references, VALIDITY_FLOOR)
    write_text(out / "sweep.md", sweep_md)
    write_sweep_charts(out, grid_runs, picks)
    print("\n" + sweep_md + f"\nsweep: wrote {out / 'sweep_picks.json'}, {out / 'sweep.md'} "
          f"and frontier.svg, validity.svg, win_rate.svg in {out} | "
          f"{(time.time() - started) / 60:.1f} min")


def sweep_run(
    ref_cfg: Config, device, made_from: dict, label: str, overrides: dict, reference_samples: dict
) -> dict:
    """One grid run on one reference, judged at every third of --pref_steps up to twice it; a
    finished one saved from the same inputs is read back instead."""
    out = Path(ref_cfg.run.out_dir)
    every = judged_every(ref_cfg.prefer.pref_steps)
    tag = sweep_tag(overrides)
    path = out / f"{tag}_results.json"
    run_cfg = with_method(ref_cfg, overrides | {"pref_steps": 2 * ref_cfg.prefer.pref_steps})
    run_made_from = made_from | {"settings": stage_settings(run_cfg, "prefer")}
    saved = saved_run(path, run_made_from)
    if saved is not None:
        return saved
    seed = ref_cfg.run.seed
    train.train_preference(run_cfg, device, seed, tag, snapshot_every=every)
    points = []
    for step in range(every, run_cfg.prefer.pref_steps + 1, every):
        snapshot = f"{tag}_step{step}"
        results = train.evaluate_policy(
            run_cfg, device, seed, snapshot, reference_samples
        )
        point = {key: report.nested(results, key_path) for key, key_path in POINT_KEYS.items()}
        points.append({"step": step} | point)
        (out / f"{snapshot}.pt").unlink()
    run = {
        "label": label,
        "tag": tag,
        "overrides": overrides,
        "points": points,
        "reference": results["reference"],
        "made_from": run_made_from,
    }
    write_json(path, run)
    return run


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
    """Every (setting, length) of one method's runs, with its judged point on every reference."""
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
    return list(candidates.values())


def validity_margin(candidate: dict, reference_valid: dict[int, float]) -> float:
    """How far the point's valid rate stays above VALIDITY_FLOOR x the reference's own, at worst
    over the references (negative: below it on some reference)."""
    return min(
        point["valid_rate"] - VALIDITY_FLOOR * reference_valid[int(seed)]
        for seed, point in candidate["validation"].items()
    )


def sweep_grid() -> list[tuple[str, dict]]:
    """Every (method label, overrides) the sweep trains: SWEEP_LRS x SWEEP_KNOBS, then
    SWEEP_EXTENSIONS."""
    grid = [
        (label, knobs | {"pref_lr": lr})
        for label, all_knobs in SWEEP_KNOBS.items()
        for knobs in all_knobs
        for lr in SWEEP_LRS
    ]
    return grid + [
        (label, overrides)
        for label, extensions in SWEEP_EXTENSIONS.items() if label in SWEEP_KNOBS
        for overrides in extensions
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
    """frontier.svg: judge score against KL at every point of every grid run, each the mean over
    the references; validity.svg and win_rate.svg: along the picked setting's runs of each
    method, the mean over the references."""

    def mean_points(runs: list[dict]) -> list[dict]:  # the same run on every reference
        return [
            {key: statistics.fmean(points[key] for points in same_step) for key in same_step[0]}
            for same_step in zip(*(run["points"] for run in runs))
        ]

    def run_means(runs_by_seed: dict, tag: str) -> list[dict]:
        return mean_points([run for runs in runs_by_seed.values() for run in runs
                            if run["tag"] == tag])

    frontier = {
        label: [
            (point["kl_from_reference"], point["judge_score"])
            for run in next(iter(runs_by_seed.values()))
            for point in run_means(runs_by_seed, run["tag"])
        ]
        for label, runs_by_seed in grid_runs.items()
    }
    chart = report.svg_chart(
        "Reward-KL frontier (validation prompts, every grid point, mean over references)",
        "KL(policy || reference), log scale",
        "judge score",
        frontier,
        lines=False,
        log_x=True,
    )
    write_text(out / "frontier.svg", chart)
    for key, name, title in (
        ("valid_rate", "validity", "Validity"),
        ("win_rate", "win_rate", "Win rate over the reference"),
    ):
        series = {
            label: [(p["step"], p[key]) for p in run_means(grid_runs[label], pick["run"])]
            for label, pick in picks.items()
            if label in grid_runs  # not MATCHED_KL, a second pick of FPO's
        }
        chart = report.svg_chart(
            f"{title} along training, each method at its pick's setting (mean over references)",
            "steps",
            key.replace("_", " "),
            series,
            lines=True,
        )
        write_text(out / f"{name}.svg", chart)


# ----------------------------------------------------------------------------------------------
# --compare: each method at its --sweep pick, on the test prompts of --seeds references


def compare_rows(cfg: Config) -> dict[str, dict]:
    """Each row's preference settings: the picks in --picks, or in out_dir's sweep_picks.json if
    it holds one (FPO's also with alpha 0, beside alpha 0's own pick; DPO's also from the offline
    cache), else COMPARE_ROWS
    at the default length. Picks tuned with other settings (pretraining, SAE, data, training or
    judging) are refused: they were tuned for another recipe."""
    path = Path(cfg.run.picks) if cfg.run.picks else Path(cfg.run.out_dir) / "sweep_picks.json"
    if not path.exists():
        print(f"compare: no {path} (run --sweep first to tune every method alike); "
              "using COMPARE_ROWS")
        return COMPARE_ROWS
    saved = read_json(path, "rerun --sweep")
    if not (isinstance(saved, dict) and isinstance(saved.get("made_from"), dict)):
        raise UsageError(
            f"{path} does not record what it was made from (an older version wrote it): "
            "rerun --sweep, or delete it"
        )
    check_made_from(path, saved, recipe(cfg), "rerun --sweep with these flags, or pass its own")
    picks = {label: pick["settings"] for label, pick in saved["picks"].items()}
    print(f"compare: the settings --sweep picked, from {path}")
    rows = {"FPO": picks["FPO"], "FPO (alpha=0) at FPO's pick": picks["FPO"] | {"alpha": 0.0}}
    for label, settings in picks.items():
        rows[label] = settings
        if label == "DPO":
            rows["DPO (offline cache)"] = settings | {"method": "dpo_offline"}
    return rows


def compare(cfg: Config, device) -> None:
    """Every row of compare_rows on each of --seeds references (whole pipelines of seeds
    --seed, --seed + 1, ...), judged on the test prompts: compare.md (mean and spread over the
    references, each reference's own numbers, and paired differences from FPO bootstrapped over
    references and prompts) and compare.json."""
    out = Path(cfg.run.out_dir)
    settings = compare_rows(cfg)
    seeds = compare_seeds(cfg)
    print(f"\n== compare: {', '.join(settings)} on {len(seeds)} references "
          f"(seeds {seeds[0]}-{seeds[-1]}) ==")
    rows = []
    made_from = {}
    started = time.time()
    for number, seed in enumerate(seeds, 1):
        print(f"compare: reference {number}/{len(seeds)} (seed {seed}) | "
              f"{time.time() - started:.0f}s", flush=True)
        ref_cfg = reference_run(cfg, seed, device)
        made_from[str(seed)] = inputs_made_from(ref_cfg, device)
        reference_samples = {}
        for label, overrides in settings.items():
            row_cfg = with_method(ref_cfg, overrides)
            tag = compare_tag(label, seed)
            row_path = Path(ref_cfg.run.out_dir) / f"{tag}_results.json"
            # A row finished before an interruption counts only if made from this GPT, SAE and
            # data, with these training and judging settings (the picks may have changed).
            row_made_from = made_from[str(seed)] | {
                "eval": dataclasses.asdict(cfg.eval),
                "settings": stage_settings(row_cfg, "prefer", seed),
            }
            saved = saved_run(row_path, row_made_from) if cfg.run.resume else None
            if saved is not None:
                print(f"compare: {label}, seed {seed}: finished earlier ({row_path}); "
                      "skipped (--resume)")
                rows.append(saved)
                continue
            cost = train_in_child(
                tag,
                "rerun with --resume to continue it from its last saved step",
                train.train_preference,
                row_cfg,
                device,
                seed,
                tag,
            )
            results = train.evaluate_policy(row_cfg, device, seed, tag, reference_samples)
            results.update(
                label=label, median_step_ms=1000 * cost["median_step_s"], made_from=row_made_from
            )
            write_json(row_path, results)
            rows.append(results)
    labels = list(settings)
    table = report.compare_table(
        rows, labels, TABLE_COLUMNS, seeds, win_rate_differences(rows, labels)
    )
    write_text(out / "compare.md", table)
    compare_json = {
        "rows": rows,
        "settings": settings,
        "preference": dataclasses.asdict(cfg.prefer),
        "made_from": made_from,
    }
    write_json(out / "compare.json", compare_json)
    print("\n" + table)
    first = Path(cfg.run.out_dir) / f"ref_seed{seeds[0]}"
    for label in settings:
        print(report.text_chart(label, first / f"{compare_tag(label, seeds[0])}_log.jsonl"))
    print(f"compare: wrote {out / 'compare.md'} and {out / 'compare.json'} | "
          f"{(time.time() - started) / 60:.1f} min")


def win_rate_differences(rows: list[dict], labels: list[str]) -> dict:
    """Paired differences in per-prompt wins over the same references and prompts, {"A - B":
    (mean, low, high)}: FPO's from each other row's, and FPO at TDPO-2's KL from TDPO-2's; empty
    without judged rows."""
    if not any("prompt_wins" in row for row in rows if row["label"] == "FPO"):
        return {}
    pairs = [("FPO", label) for label in labels[1:]]
    if MATCHED_KL in labels and "TDPO-2" in labels:
        pairs.append((MATCHED_KL, "TDPO-2"))
    return row_differences(rows, pairs)


def row_differences(rows: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """{"A - B": (mean, low, high)}: paired differences in per-prompt wins of rows A and B (by
    label) over the same references and prompts, for each (A, B) of pairs."""
    by_seed = sorted(rows, key=lambda r: r["seed"])

    def wins(label: str) -> list[list[float]]:
        return [row["prompt_wins"] for row in by_seed if row["label"] == label]

    return {f"{a} - {b}": paired_difference(wins(a), wins(b)) for a, b in pairs}


def write_outputs(out: Path, name: str, table: str, chart: str, started: float) -> None:
    """An experiment's results: out/<name>.md (its tables) and out/<name>.svg (its picture), then
    the tables, where both went and how long it took."""
    write_text(out / f"{name}.md", table)
    write_text(out / f"{name}.svg", chart)
    print("\n" + table + f"\n{name}: wrote {out / f'{name}.md'} and {out / f'{name}.svg'} | "
          f"{(time.time() - started) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------
# --head_to_head: FPO's response judged against each other method's on the same prompt (the
# paper's Table 2 metric) at five temperatures (its Fig. 3-right), from --compare's policies

HEAD_TO_HEAD_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)


def head_to_head(cfg: Config, device) -> None:
    """At each of HEAD_TO_HEAD_TEMPERATURES, every policy --compare trained answers its
    reference's test prompts once, and the judge compares FPO's response with each other
    method's on the same prompt; a tie counts half. Nothing is trained: the policies are those
    of compare.json's rows. Writes head_to_head.md (mean over references and prompts with a 95%
    bootstrap interval over both) and head_to_head.svg."""
    out = Path(cfg.run.out_dir)
    compare_json = read_json(out / "compare.json", "run --compare first")
    labels = list(compare_json["settings"])
    seeds = sorted({row["seed"] for row in compare_json["rows"]})
    temperatures = HEAD_TO_HEAD_TEMPERATURES
    print(f"\n== head to head: FPO against {', '.join(labels[1:])} at temperatures "
          f"{', '.join(map(str, temperatures))}, on {len(seeds)} references ==")
    scores = {}  # (seed, temperature): {label: the judge's score per test prompt}
    started = time.time()
    for seed in seeds:
        ref_cfg = reference_run(cfg, seed, device)
        rows = {row["label"]: row["made_from"] for row in compare_json["rows"]
                if row["seed"] == seed}
        for temperature in temperatures:
            print(f"head to head: seed {seed}, temperature {temperature} | "
                  f"{time.time() - started:.0f}s", flush=True)
            scores[seed, temperature] = judged_scores(ref_cfg, device, rows, temperature)
    results = {
        label: {
            temperature: bootstrap_mean([
                [win_rate([fpo], [other]) for fpo, other in zip(
                    scores[seed, temperature]["FPO"], scores[seed, temperature][label], strict=True
                )]
                for seed in seeds
            ])
            for temperature in temperatures
        }
        for label in labels[1:]
    }
    n_prompts = len(scores[seeds[0], temperatures[0]]["FPO"])
    table = report.head_to_head_table(results, temperatures, seeds, n_prompts)
    series = {
        label: [(temperature, mean) for temperature, (mean, _, _) in by_temperature.items()]
        for label, by_temperature in results.items()
    }
    series["a tie (0.5)"] = [(temperatures[0], 0.5), (temperatures[-1], 0.5)]
    chart = report.svg_chart(
        "FPO's head-to-head win rate against each method (test prompts)",
        "sampling temperature",
        "FPO's win rate",
        series,
        lines=True,
    )
    write_outputs(out, "head_to_head", table, chart, started)


def judged_scores(ref_cfg: Config, device, rows: dict, temperature: float) -> dict:
    """{label: the judge's score of the policy's sample per test prompt} at this temperature, for
    the policies of one reference's compare rows ({label: the row's made_from}); read back from
    head_to_head_t<temperature>.json when made from the same rows and judging."""
    seed = ref_cfg.run.seed
    eval_cfg = dataclasses.replace(ref_cfg.eval, temperature=temperature)
    path = Path(ref_cfg.run.out_dir) / f"head_to_head_t{temperature:g}.json"
    made_from = {"rows": rows, "eval": dataclasses.asdict(eval_cfg)}
    saved = saved_run(path, made_from)
    if saved is not None:
        return saved["scores"]
    reference, gpt_fingerprint = train.load_gpt(ref_cfg, device)
    reference.eval().requires_grad_(False)
    inputs = train.load_preference_inputs(ref_cfg, reference, gpt_fingerprint, device)
    prompt_texts, _ = train.held_out_prompts(ref_cfg, inputs)
    prompts = encode_prompts(prompt_texts, inputs.enc, reference.config.block_size)
    scores = {}
    for label in rows:
        policy, _ = train.load_policy(ref_cfg, compare_tag(label, seed), reference, inputs, device)
        responses = sample_responses(policy, prompts, inputs.enc, eval_cfg, seed, device)
        scores[label] = judge_stats(prompt_texts, responses, inputs.enc)["scores"]
    write_json(path, {"scores": scores, "made_from": made_from})
    return scores


# ----------------------------------------------------------------------------------------------
# --ablation: FPO at the default setting with one thing changed (the paper's Table 3, and k)

ABLATION_ALPHAS = (0.0, 1.0, 4.0, 16.0, 64.0)
ABLATION_FPO_KS = (4, 8, 16, 32, 64, 256)
ABLATION_COLUMNS = {  # column: (results key path, digits); the paper's three first
    "reward acc (train)": (("train_reward_accuracy",), 3),
    "reward acc (held-out)": (("reward_accuracy",), 3),
    "entropy": (("policy", "entropy_per_token"), 3),
    "win rate": (("win_rate",), 3),
    "valid": (("policy", "valid_rate"), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
    "length": (("policy", "mean_length"), 1),
}


def ablation_rows(cfg: Config) -> dict[str, dict[str, dict]]:
    """{table: {row label: the settings it changes}}: the SAE on every block; alpha with and
    without the stop-gradient on D(y_w); FPO's k with alpha scaled by default k / k (D(y) is a
    mean over the union of top-k sets, so the constraint's weight moves with k) and fixed."""
    pref_cfg = cfg.prefer
    return {
        "The SAE's block": {
            f"block {block}": {"sae_layer": block} for block in range(cfg.pretrain.n_layer)
        },
        "alpha, with and without the stop-gradient on D(y_w)": {
            f"alpha {alpha:g}, stop-gradient {'on' if stop else 'off'}": {
                "alpha": alpha, "fpo_stop_grad": stop
            }
            for alpha in ABLATION_ALPHAS
            for stop in (True, False)
        },
        f"FPO's k, alpha scaled by {pref_cfg.fpo_k}/k or fixed at {pref_cfg.alpha:g}": {
            f"k {k}, alpha {alpha:g} ({scaled})": {"fpo_k": k, "alpha": alpha}
            for k in ABLATION_FPO_KS
            for scaled, alpha in (
                ("scaled", pref_cfg.alpha * pref_cfg.fpo_k / k), ("fixed", pref_cfg.alpha)
            )
        },
    }


def ablation(cfg: Config, device) -> None:
    """FPO at the default settings with one of them changed, per row of ablation_rows, on the
    references of --seeds (--compare's: their GPTs and SAEs are shared), judged on the test
    prompts. Rows with the same settings are trained once; a finished run made from the same
    inputs is read back. Writes ablation.md (mean ± std over the references) and ablation.svg."""
    out = Path(cfg.run.out_dir)
    tables = ablation_rows(cfg)
    seeds = compare_seeds(cfg)
    n_rows = sum(map(len, tables.values()))
    print(f"\n== ablation: {n_rows} rows of FPO on {len(seeds)} references "
          f"(seeds {seeds[0]}-{seeds[-1]}) ==")
    rows = {table: [] for table in tables}
    started = time.time()
    for seed in seeds:
        ref_cfg = reference_run(cfg, seed, device)
        for table, changes in tables.items():
            for label, changed in changes.items():
                print(f"ablation: seed {seed}, {label} | {time.time() - started:.0f}s", flush=True)
                results = fpo_variant(ref_cfg, device, changed)
                rows[table].append(results | {"label": label})
    pref_cfg = cfg.prefer
    sections = [
        f"Every row is FPO at beta {pref_cfg.beta:g}, alpha {pref_cfg.alpha:g}, k "
        f"{pref_cfg.fpo_k}, pref_lr {pref_cfg.pref_lr:g}, {pref_cfg.pref_steps} steps, the SAE on "
        f"block {cfg.sae.sae_layer % cfg.pretrain.n_layer} and the stop-gradient on, but for "
        "what the row names. Test prompts.\n"
    ]
    n_prompts = len(rows[next(iter(tables))][0]["prompt_wins"])
    for table, changes in tables.items():
        default = next(label for label, changed in changes.items() if is_default(cfg, changed))
        pairs = [(label, default) for label in changes if label != default]
        summary = report.compare_table(
            rows[table], list(changes), ABLATION_COLUMNS, seeds, {}, "setting"
        )
        differences = report.difference_table(
            row_differences(rows[table], pairs), len(seeds), n_prompts
        )
        sections.append(f"### {table}\n\n{summary}\n{differences}")
    write_outputs(out, "ablation", "\n".join(sections), ablation_chart(rows, tables), started)


def is_default(cfg: Config, changed: dict) -> bool:
    """Whether an ablation row's changed settings are all the defaults: the row the others are
    compared with."""
    defaults = dataclasses.asdict(cfg.prefer) | {
        "sae_layer": cfg.sae.sae_layer % cfg.pretrain.n_layer
    }
    return all(defaults[key] == value for key, value in changed.items())


def fpo_variant(ref_cfg: Config, device, changed: dict) -> dict:
    """FPO trained and judged on one reference with `changed` settings (the SAE's block, or any
    of the preference settings); read back when a run of the same settings from the same inputs
    finished. A change of the SAE's block trains an SAE (and its cache) on that block, in its own
    directory beside the reference's."""
    pref_changes = {key: value for key, value in changed.items() if key != "sae_layer"}
    if pref_changes.get("alpha") == 0.0:  # no constraint: the stop-gradient changes nothing
        pref_changes["fpo_stop_grad"] = True
    run_cfg = with_method(ref_cfg, {"method": "fpo"} | pref_changes)
    block = changed.get("sae_layer", ref_cfg.sae.sae_layer) % ref_cfg.pretrain.n_layer
    if block != ref_cfg.sae.sae_layer % ref_cfg.pretrain.n_layer:
        run_cfg = sae_on_block(run_cfg, block, device)
    pref_cfg = run_cfg.prefer
    tag = (f"fpo_block{block}_alpha{pref_cfg.alpha:g}_k{pref_cfg.fpo_k}"
           f"_stopgrad{int(pref_cfg.fpo_stop_grad)}")
    if pref_cfg.fpo_latents:
        tag += "_latents" + hashlib.sha256(pref_cfg.fpo_latents.encode()).hexdigest()[:8]
    path = Path(run_cfg.run.out_dir) / f"{tag}_results.json"
    made_from = inputs_made_from(run_cfg, device) | {
        "eval": dataclasses.asdict(run_cfg.eval),
        "settings": stage_settings(run_cfg, "prefer"),
    }
    saved = saved_run(path, made_from)
    if saved is not None:
        return saved
    seed = run_cfg.run.seed
    train.train_preference(run_cfg, device, seed, tag)
    results = train.evaluate_policy(run_cfg, device, seed, tag, training_accuracy=True)
    results["made_from"] = made_from
    write_json(path, results)
    return results


def sae_on_block(ref_cfg: Config, block: int, device) -> Config:
    """ref_cfg in the reference's sae_block<block>/ directory: the reference GPT (copied there)
    with an SAE trained on that block's output, made once."""
    block_dir = Path(ref_cfg.run.out_dir) / f"sae_block{block}"
    block_dir.mkdir(exist_ok=True)
    block_cfg = dataclasses.replace(
        ref_cfg,
        run=dataclasses.replace(ref_cfg.run, out_dir=str(block_dir)),
        sae=dataclasses.replace(ref_cfg.sae, sae_layer=block),
    )
    if not (block_dir / "gpt.pt").exists():
        write_atomically(block_dir / "gpt.pt",
                         lambda tmp: shutil.copyfile(Path(ref_cfg.run.out_dir) / "gpt.pt", tmp))
    make_once(block_cfg, "sae", device)
    return block_cfg


def ablation_chart(rows: dict, tables: dict) -> str:
    """Win rate and validity against alpha, with and without the stop-gradient (mean over the
    references), one panel each."""
    table = next(name for name in tables if name.startswith("alpha"))
    panels = {}
    for key, name in ((("win_rate",), "win rate"), (("policy", "valid_rate"), "valid")):
        for stop in ("on", "off"):
            panels[f"{name}, stop-gradient {stop}"] = [
                (alpha, statistics.fmean(
                    report.nested(row, key) for row in rows[table]
                    if row["label"] == f"alpha {alpha:g}, stop-gradient {stop}"
                ))
                for alpha in ABLATION_ALPHAS
            ]
    return report.svg_panels("FPO's alpha, with and without the stop-gradient", "alpha", panels)


# ----------------------------------------------------------------------------------------------
# --control: FPO's constraint on chosen latents only (the paper's Sec. 5.3, Table 4)

CONTROL_LATENTS = 8  # latents per chosen set
CONTROL_COLUMNS = {  # column: (results key path, digits)
    "positive": (("policy", "positive_rate"), 3),
    "positive - reference": (("positive_change",), 3),
    "on topic": (("policy", "on_topic_rate"), 3),
    "on topic - reference": (("on_topic_change",), 3),
    "win rate": (("win_rate",), 3),
    "valid": (("policy", "valid_rate"), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
}


def control(cfg: Config, device) -> None:
    """FPO at the default settings with D(y) over four sets of latents, on the references of
    --seeds: all of them (as always), the CONTROL_LATENTS that most separate positive from
    negative words, those that most separate the topics (evaluate.attribute_latents, found on
    each reference's held-out pairs), and as many at random. Each set's effect on the judge's
    positive and on-topic rates, against the reference's. Writes control.md and control.svg."""
    out = Path(cfg.run.out_dir)
    seeds = compare_seeds(cfg)
    print(f"\n== control: FPO constrained on chosen latents, on {len(seeds)} references ==")
    rows = []
    chosen = {}  # seed: {set: latents}
    started = time.time()
    for seed in seeds:
        ref_cfg = reference_run(cfg, seed, device)
        chosen[seed] = latent_sets(ref_cfg, device)
        for label, latents in chosen[seed].items():
            print(f"control: seed {seed}, {label} {latents} | {time.time() - started:.0f}s",
                  flush=True)
            results = fpo_variant(ref_cfg, device, {"fpo_latents": latents})
            changes = {
                f"{name}_change": results["policy"][f"{name}_rate"]
                - results["reference"][f"{name}_rate"]
                for name in ("positive", "on_topic")
            }
            rows.append(results | changes | {"label": label})
    labels = list(chosen[seeds[0]])
    table = report.compare_table(rows, labels, CONTROL_COLUMNS, seeds, {}, "D(y) over")
    # Each chosen set against all latents, and each attribute's set against a random one as large.
    pairs = [(label, labels[0]) for label in labels[1:]]
    pairs += [(label, labels[-1]) for label in labels[1:-1]]
    table += "\n" + report.difference_table(
        row_differences(rows, pairs), len(seeds), len(rows[0]["prompt_wins"])
    )
    sets = "\n".join(
        f"- seed {seed}: " + "; ".join(f"{label} {latents or 'all'}"
                                      for label, latents in by_label.items())
        for seed, by_label in chosen.items()
    )
    control_md = f"{table}\nThe latents of each set, per reference:\n\n{sets}\n"
    series = {
        label: [(row["positive_change"], row["on_topic_change"])
                for row in rows if row["label"] == label]
        for label in labels
    }
    chart = report.svg_chart(
        "What constraining chosen latents does (one point per reference)",
        "positive rate, policy - reference",
        "on-topic rate, policy - reference",
        series,
        lines=False,
    )
    write_outputs(out, "control", control_md, chart, started)


def latent_sets(ref_cfg: Config, device) -> dict[str, str]:
    """{set: --fpo_latents}: every latent (empty), the sentiment and the topic latents of
    evaluate.attribute_latents on the reference's held-out pairs, and a random set as large."""
    reference, gpt_fingerprint = train.load_gpt(ref_cfg, device)
    reference.eval().requires_grad_(False)
    inputs = train.load_preference_inputs(ref_cfg, reference, gpt_fingerprint, device)
    eos = data.eos_id(inputs.enc)
    batches = (
        (input_ids, mask)
        for _, input_ids, mask in data.every_pair(inputs.test_pairs, 64, 0, eos, device)
    )
    found = attribute_latents(
        reference, inputs.sae, ref_cfg.sae.sae_layer, batches, inputs.enc, CONTROL_LATENTS
    )
    generator = torch.Generator().manual_seed(ref_cfg.run.seed)
    drawn = torch.randperm(inputs.sae.d_sae, generator=generator)[:CONTROL_LATENTS]
    return {
        "all latents": "",
        "sentiment latents": ",".join(map(str, found["sentiment"])),
        "topic latents": ",".join(map(str, found["topic"])),
        "random latents": ",".join(map(str, sorted(drawn.tolist()))),
    }


# ----------------------------------------------------------------------------------------------
# --bound: does the change of the SAE codes bound the per-token KL (the paper's Appendix B), and
# does D(y) track SeqKL(y) (its Fig. 4-right)? On --compare's policies


def bound(cfg: Config, device) -> None:
    """For the reference and every policy --compare trained, on each reference's held-out pairs
    (chosen and rejected responses): per generating position, KL(pi_ref || pi_theta) against
    M ||c_theta - c_ref||^2 (evaluate.bound_constant), and per response D(y) against SeqKL(y);
    then both along FPO's training at its pick (fpo_trajectory, the one run trained here).
    Writes bound.md and bound.svg."""
    out = Path(cfg.run.out_dir)
    compare_json = read_json(out / "compare.json", "run --compare first")
    labels = list(compare_json["settings"])
    seeds = sorted({row["seed"] for row in compare_json["rows"]})
    print(f"\n== bound: {len(labels)} policies on {len(seeds)} references ==")
    terms = {label: [] for label in labels}  # label: per reference, bound_terms of every pair
    constants = {}  # seed: M
    trajectories = {}  # seed: FPO's mean SeqKL(y) and D(y) along its training
    started = time.time()
    for seed in seeds:
        ref_cfg = reference_run(cfg, seed, device)
        reference, gpt_fingerprint = train.load_gpt(ref_cfg, device)
        reference.eval().requires_grad_(False)
        inputs = train.load_preference_inputs(ref_cfg, reference, gpt_fingerprint, device)
        for label in labels:
            print(f"bound: seed {seed}, {label} | {time.time() - started:.0f}s", flush=True)
            tag = compare_tag(label, seed)
            policy, _ = train.load_policy(ref_cfg, tag, reference, inputs, device)
            terms[label].append(held_out_bound_terms(policy, reference, inputs, ref_cfg, device))
        sigma = min(t[-1]["sigma"].min().item() for t in terms.values())
        constants[seed] = bound_constant(reference, inputs.sae, sigma)
        trajectories[seed] = fpo_trajectory(
            ref_cfg, device, compare_json["settings"]["FPO"], reference, inputs
        )
    table = report.bound_table(bound_summary(terms, constants, seeds), constants)
    table += "\n" + report.trajectory_table(trajectories)
    series = {
        label: [
            (t["sequence_kl"].mean().item(), t["feature_drift"].mean().item())
            for t in by_seed
        ]
        for label, by_seed in terms.items()
    }
    series["FPO along training"] = [
        (point["sequence_kl"], point["feature_drift"])
        for points in trajectories.values()
        for point in points
    ]
    chart = report.svg_chart(
        "D(y) against SeqKL(y): held-out responses, mean per reference and method",
        "SeqKL(y) = sum of per-token KL(ref || policy), log scale",
        "D(y)",
        series,
        lines=False,
        log_x=True,
    )
    write_outputs(out, "bound", table, chart, started)


def fpo_trajectory(
    ref_cfg: Config, device, settings: dict, reference, inputs
) -> list[dict]:
    """FPO trained at `settings` once more, judged by its mean SeqKL(y) and D(y) on the held-out
    responses at every fifth of its steps (the analogue of the paper's Fig. 4-right); read back
    from bound_fpo_trajectory.json when made from the same reference and settings."""
    run_cfg = with_method(ref_cfg, settings)
    every = max(1, run_cfg.prefer.pref_steps // 5)
    tag = "bound_fpo_trajectory"
    out = Path(run_cfg.run.out_dir)
    made_from = inputs_made_from(run_cfg, device) | {
        "settings": stage_settings(run_cfg, "prefer")
    }
    saved = saved_run(out / f"{tag}.json", made_from)
    if saved is not None:
        return saved["points"]
    train.train_preference(run_cfg, device, run_cfg.run.seed, tag, snapshot_every=every)
    points = []
    for step in range(every, run_cfg.prefer.pref_steps + 1, every):
        snapshot = f"{tag}_step{step}"
        policy, _ = train.load_policy(run_cfg, snapshot, reference, inputs, device)
        terms = held_out_bound_terms(policy, reference, inputs, run_cfg, device)
        points.append({"step": step} | {
            key: terms[key].mean().item() for key in ("sequence_kl", "feature_drift")
        })
        (out / f"{snapshot}.pt").unlink()
    write_json(out / f"{tag}.json", {"points": points, "made_from": made_from})
    return points


def held_out_bound_terms(policy, reference, inputs, ref_cfg: Config, device) -> dict:
    """bound_terms over every held-out pair, batch by batch (chosen rows first in each), on the
    CPU, with `is_chosen` per response."""
    eos = data.eos_id(inputs.enc)
    batches = []
    for _, input_ids, mask in data.every_pair(inputs.test_pairs, 64, 0, eos, device):
        terms = bound_terms(policy, reference, inputs.sae, ref_cfg.sae.sae_layer, input_ids,
                            mask, ref_cfg.prefer.fpo_k)
        half = len(input_ids) // 2
        terms["is_chosen"] = torch.arange(len(input_ids), device=input_ids.device) < half
        batches.append({key: value.cpu() for key, value in terms.items()})
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def bound_summary(terms: dict, constants: dict, seeds: list[int]) -> dict[str, dict]:
    """Per method: how often KL_t <= M ||dc_t||^2 holds, the quantiles of KL_t / (M ||dc_t||^2)
    where the codes moved, the median of KL_t over its first step, a quarter of the logits'
    squared distance, Spearman's correlation of KL_t with ||dc_t||^2 (per position) and of
    SeqKL(y) with D(y) (per response), and of the margins SeqKL(y_l) - SeqKL(y_w) with
    D(y_l) - D(y_w) (per pair), each with a bootstrap interval over references and items."""
    summary = {}
    for label, by_seed in terms.items():
        bounds = [constants[seed] * t["code_gap"] for seed, t in zip(seeds, by_seed)]
        kls = [t["kl"] for t in by_seed]
        ratios = torch.cat([kl[b > 0] / b[b > 0] for kl, b in zip(kls, bounds)])
        margins = {
            key: [t[key][~t["is_chosen"]] - t[key][t["is_chosen"]] for t in by_seed]
            for key in ("sequence_kl", "feature_drift")
        }
        logit_gaps = torch.cat([t["logit_gap"] for t in by_seed])
        moved = logit_gaps > 0
        summary[label] = {
            "holds": torch.cat([kl <= b for kl, b in zip(kls, bounds)]).double().mean().item(),
            "softmax step": torch.median(torch.cat(kls)[moved] / (logit_gaps[moved] / 4)).item(),
            "ratio quantiles": torch.quantile(
                ratios.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
            ).tolist() if len(ratios) else [float("nan")] * 3,
            "token": bootstrap_spearman(kls, [t["code_gap"] for t in by_seed]),
            "response": bootstrap_spearman(
                [t["sequence_kl"] for t in by_seed], [t["feature_drift"] for t in by_seed]
            ),
            "margin": bootstrap_spearman(margins["sequence_kl"], margins["feature_drift"]),
        }
    return summary


# ----------------------------------------------------------------------------------------------
# --bench, and the memory of a training loop alone, with everything it needs already loaded


class LiveTensorBytes(TorchDispatchMode):
    """While active, the bytes of every tensor storage an op allocates, until it is freed: `peak`
    is the most that was live at once, counting nothing allocated before (weights, data, cache).
    Outputs that alias an input (views, in-place updates) allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if id(storage) in self.tracked or storage.data_ptr() in inputs:
                continue
            self.tracked.add(id(storage))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            # runs when the storage is freed
            weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes


class LoopPeakMemory:
    """Around a training loop (train_preference's `measure`), two peaks in MB:
    - `loop_mb`, the loop's own: on CUDA max allocated above what was allocated on entering; on
      the CPU and MPS the peak of live tensor bytes allocated inside the loop (LiveTensorBytes);
    - `rss_mb`, the whole process's peak resident set size (since entering on Linux, over its
      lifetime elsewhere): torch, data and cache included, which every method holds alike."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loop_mb = float("nan")
        self.rss_mb = float("nan")
        self.tensors = LiveTensorBytes()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_before = torch.cuda.memory_allocated(self.device)
        else:
            self.tensors.__enter__()
        if Path("/proc/self/clear_refs").exists():
            # a switch of the kernel's, not a file of ours: written in place, never renamed over
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.loop_mb = (peak - self.allocated_before) / 2**20
        else:
            self.tensors.__exit__(*exc)
            self.loop_mb = self.tensors.peak / 2**20
        status = Path("/proc/self/status")
        if status.exists():
            peak_kb = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)
            self.rss_mb = int(peak_kb) / 2**10
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # bytes on macOS, KiB elsewhere
            self.rss_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
        return False


def train_and_measure(cfg: Config, device, seed: int, tag: str) -> dict:
    """train_preference, with its median step time and its loop's peak memory."""
    memory = LoopPeakMemory(device)
    cost = train.train_preference(cfg, device, seed, tag, measure=memory)
    return cost | {"loop_memory_mb": memory.loop_mb, "peak_rss_mb": memory.rss_mb}


def bench(cfg: Config, device) -> None:
    """Median training-step time of each method on identical batches, interleaved A B C A B C so
    drift in machine speed hits every method alike; then each method's training-loop memory,
    measured in a fresh process that loads only what that method needs. The GPT size flags pick
    the model (a short --pretrain_steps is enough for timing). It runs on the reference of
    --seed, shared with the other experiments."""
    out = Path(cfg.run.out_dir)
    cfg = reference_run(cfg, cfg.run.seed, device)
    print(f"\n== bench: {cfg.run.bench_steps} interleaved steps per method ==")
    reference, gpt_fingerprint = train.load_gpt(cfg, device)
    reference.eval().requires_grad_(False)
    inputs = train.load_preference_inputs(cfg, reference, gpt_fingerprint, device)
    settings = {
        label: with_method(cfg, overrides).prefer for label, overrides in COMPARE_ROWS.items()
    }
    policies = {label: GPT(reference.config).to(device) for label in settings}
    optimizers = {}
    for label, policy in policies.items():
        policy.load_state_dict(reference.state_dict())
        optimizers[label] = torch.optim.AdamW(
            policy.parameters(), lr=settings[label].pref_lr, weight_decay=0.0
        )
    n_warmup = 3
    eos = data.eos_id(inputs.enc)
    step_ms = {label: [] for label in settings}
    for step in range(n_warmup + cfg.run.bench_steps):
        picks = batch_indices(
            len(inputs.train_pairs), cfg.prefer.pref_batch_size, cfg.run.seed, step
        )
        batch = data.pair_batch(inputs.train_pairs, picks, row_offset=0, eos_id=eos, device=device)
        for label, pref_cfg in settings.items():
            started = time.perf_counter()
            with autocast(device):
                result = train.preference_losses(
                    pref_cfg, cfg.sae.sae_layer, policies[label], batch, inputs, reference
                )
            optimizers[label].zero_grad(set_to_none=True)
            result.losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(policies[label].parameters(), pref_cfg.grad_clip)
            optimizers[label].step()
            synchronize(device)
            if step >= n_warmup:
                step_ms[label].append(1000 * (time.perf_counter() - started))
    results = {
        label: {"median_step_ms": statistics.median(times)} for label, times in step_ms.items()
    }
    # Never resumed: a loop resumed with its optimizer's moments already loaded would not count
    # their memory.
    fresh_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=False))
    for label, overrides in COMPARE_ROWS.items():
        memory_cfg = with_method(fresh_cfg, overrides | {"pref_steps": n_warmup + 2})
        tag = "bench_" + compare_tag(label, cfg.run.seed)
        results[label] |= train_in_child(
            tag, "rerun --bench", train_and_measure, memory_cfg, device, cfg.run.seed, tag
        )
    ratios = {
        f"FPO/{other} {measure}": results["FPO"][key] / results[other][key]
        for measure, key in (("time", "median_step_ms"), ("loop memory", "loop_memory_mb"))
        for other in ("SimPO", "DPO", "TDPO-2")
    }
    pretrain_cfg = cfg.pretrain
    n_parameters = sum(p.numel() for p in reference.parameters())
    memory_kind = "max allocated" if device.type == "cuda" else "live tensors"
    lines = [
        f"GPT {pretrain_cfg.n_layer} x {pretrain_cfg.n_embd}, {n_parameters:,} parameters; "
        f"SAE {inputs.sae.d_sae} latents; {device}\n",
        f"| method | median ms/step | loop memory MB ({memory_kind}) | peak RSS MB |",
        "|---|---|---|---|",
    ]
    for label, values in results.items():
        lines.append(f"| {label} | {values['median_step_ms']:.1f} | "
                     f"{values['loop_memory_mb']:.1f} | {values['peak_rss_mb']:.0f} |")
    lines.append("\n" + " | ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
    bench_md = "\n".join(lines) + "\n"
    print("\n" + bench_md)
    write_text(out / "bench.md", bench_md)
    path = out / "bench.json"
    # Nothing is judged here, so the judging settings are not part of it.
    made_from = inputs_made_from(cfg, device) | {
        "settings": {
            label: stage_settings(with_method(cfg, overrides), "prefer")
            for label, overrides in COMPARE_ROWS.items()
        }
    }
    bench_json = {
        "device": str(device),
        "steps": cfg.run.bench_steps,
        "gpt": dataclasses.asdict(pretrain_cfg),
        "d_sae": inputs.sae.d_sae,
        "methods": results,
        "ratios": ratios,
        "made_from": made_from,
    }
    write_json(path, bench_json)
    print(f"bench: wrote {out / 'bench.md'} and {path}")


def main(argv: list[str]) -> None:
    cfg = parse_args(argv, description=__doc__.split("\n\n")[0], prog="experiments.py")
    experiments = {
        "sweep": sweep,
        "compare": compare,
        "head_to_head": head_to_head,
        "ablation": ablation,
        "control": control,
        "bound": bound,
        "bench": bench,
    }
    chosen = [name for name in experiments if getattr(cfg.run, name)]
    if len(chosen) != 1:
        raise UsageError(
            "pick one experiment: --sweep, --compare, --head_to_head, --ablation, --control, "
            "--bound or --bench"
        )
    check_experiment(cfg, chosen[0])
    device = train.start_run(cfg)
    with out_dir_lock(cfg.run.out_dir):
        experiments[chosen[0]](cfg, device)


def check_experiment(cfg: Config, experiment: str) -> None:
    """Refuse, before any work, what an experiment would fail at or silently get wrong later."""
    judged = ("sweep", "compare", "head_to_head", "ablation", "control")
    if experiment in judged and cfg.run.preference_file:
        raise UsageError(
            f"--{experiment} judges sampled responses, and the judge knows only the toy world: "
            "drop --preference_file (--bench and `python train.py` take it)"
        )
    if cfg.run.picks and experiment != "compare":
        raise UsageError(f"--picks: only --compare runs picks, not --{experiment}")
    if cfg.run.picks and not Path(cfg.run.picks).is_file():
        raise UsageError(
            f"--picks {cfg.run.picks}: no such file (docs/sweep_picks.json holds the picks the "
            "docs' tables were made with)"
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
