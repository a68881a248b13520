"""--compare: every method at its --sweep pick on the test prompts of --seeds references; and
--head_to_head: FPO's response judged against each other method's on the same prompt.

    --compare       every row of compare_rows on each reference (seeds --seed, --seed + 1, ...):
                    compare.md (mean and spread over the references, each reference's numbers,
                    paired differences from FPO) and compare.json. Each run trains in a child
                    process; --resume skips the runs that finished.
    --head_to_head  --compare's policies at 5 temperatures, judged prompt by prompt against FPO's:
                    head_to_head.md and head_to_head.svg. Nothing is trained.
"""

import dataclasses
import time
from pathlib import Path

import torch

import train
from config import METHODS, Config, PreferenceConfig, check_config, stage_settings
from evaluate import encode_prompts, judge_stats, sample_responses, win_rate
from experiments import figures, report
from experiments.common import (
    COMPARE_RESUME, RERUN, compare_tag, frozen_reference, policy_unlike, read_compare,
    reference_kept, reference_run, reference_samples, references_and_runs, row_differences,
    run_all, saved_run, train_in_child, with_method, write_outputs,
)
from experiments.settings import LabConfig, compare_seeds
from experiments.stats import bootstrap_mean
from experiments.sweep import MATCHED_KL, recipe
from loading import load_policy
from runtime import UsageError, check_made_from, read_json, write_json, write_text

# Per-method settings for --bench, and for --compare without a --sweep: FPO at config.py's
# defaults (the sweep's pick), the baselines as in their papers. beta is on the scale of each
# method's log-probs: summed for DPO and TDPO, averaged (about 15x smaller here) for FPO and SimPO.
FPO_DEFAULTS = PreferenceConfig()
COMPARE_ROWS = {
    "FPO": {"method": "fpo", "beta": FPO_DEFAULTS.beta, "alpha": FPO_DEFAULTS.alpha},
    "FPO (alpha=0)": {"method": "fpo", "beta": FPO_DEFAULTS.beta, "alpha": 0.0},
    # untuned: FPO's beta and the paper's alpha
    "FPO-KL": {"method": "fpo_kl", "beta": FPO_DEFAULTS.beta, "alpha": 0.5},
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
    "feature MSE D(y)": (("feature_mse",), 4),
    "ms/step": (("median_step_ms",), 1),
}


def compare_rows(cfg: LabConfig) -> dict[str, dict]:
    """Each row's preference settings: the picks in --picks, or in out_dir's sweep_picks.json
    if it holds one (FPO's also with alpha 0, beside alpha 0's own pick; DPO's also from the
    offline cache), else COMPARE_ROWS at --pref_steps. The picks are checked by checked_picks."""
    path = picks_path(cfg)
    if not path.exists():
        print(f"compare: no {path} (run --sweep first to tune every method alike); "
              "using COMPARE_ROWS")
        return COMPARE_ROWS
    picks, threads, _ = checked_picks(cfg)
    print(f"compare: the settings --sweep picked, from {path}")
    if threads != torch.get_num_threads():
        # A note, not a refusal: the picks are a recipe judged on other references, and the
        # docs run them at another thread count too; the table's numbers are this run's own.
        tuned = f"{threads} CPU threads" if threads else "a thread count it does not record"
        print(f"compare: note: {path} was tuned with {tuned}; this run has "
              f"{torch.get_num_threads()}, which rounds differently")
    return picked_rows(picks)


def picked_rows(picks: dict[str, dict]) -> dict[str, dict]:
    """The compare's rows from a sweep's picks: each pick, FPO's also at alpha 0 and DPO's also
    from the offline cache."""
    rows = {"FPO": picks["FPO"], "FPO (alpha=0) at FPO's pick": picks["FPO"] | {"alpha": 0.0}}
    for label, settings in picks.items():
        rows[label] = settings
        if label == "DPO":
            rows["DPO (offline cache)"] = settings | {"method": "dpo_offline"}
    return rows


def picks_path(cfg: LabConfig) -> Path:
    return Path(cfg.experiment.picks or Path(cfg.run.out_dir) / "sweep_picks.json")


def checked_picks(cfg: LabConfig) -> tuple[dict[str, dict], int | None, list[int]]:
    """The picks of --picks (or out_dir's sweep_picks.json), {label: settings}; the CPU thread
    count they were tuned with (None where the file does not record it); and the seeds of the
    references they were tuned on (none in a hand-written file). Checked before any training,
    with one line naming the file and the entry: a regular file of JSON in --sweep's shape, with
    a pick for FPO; settings that are preference flags, each of the flag's type and in its range;
    tuned for this recipe (recipe: pretraining, SAE, data, training and judging settings); and
    tuned on references other than --compare's."""
    path = picks_path(cfg)
    where = f"--picks {path}" if cfg.experiment.picks else str(path)
    remedy = "rerun --sweep, or pass docs/sweep_picks.json"
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO or a device?)"
        raise UsageError(f"{where}: {kind}, not a picks file ({remedy})")
    saved = read_json(path, "rerun --sweep")
    if not (isinstance(saved, dict) and isinstance(saved.get("made_from"), dict)):
        raise UsageError(
            f"{path} does not record what it was made from (an older version wrote it): "
            "rerun --sweep, or delete it"
        )
    if not isinstance(saved.get("picks"), dict):
        raise UsageError(f"{where}: no 'picks' object (each method's pick by label): {remedy}")
    if "FPO" not in saved["picks"]:
        raise UsageError(f"{where}: no pick for FPO, which every other row is compared with")
    picks = {}
    for label, pick in saved["picks"].items():
        if not (isinstance(pick, dict) and isinstance(pick.get("settings"), dict)):
            raise UsageError(f"{where}: the pick {label!r} has no 'settings' object")
        picks[label] = checked_settings(cfg, f"{where}: {label}'s", pick["settings"])
    tags = {}
    for label in picked_rows(picks):
        other = tags.setdefault(compare_tag(label, 0), label)
        if other != label:
            raise UsageError(
                f"{where}: the rows {other!r} and {label!r} would share their files "
                f"({compare_tag(label, 0)}): rename one"
            )
    tuned = tuned_seeds(where, saved["picks"])
    check_tuned_on(cfg, where, tuned)
    check_made_from(path, saved, recipe(cfg), "rerun --sweep with these flags, or pass its own")
    threads = saved.get("threads")
    return picks, threads if type(threads) is int else None, tuned


def checked_settings(cfg: LabConfig, named: str, settings: dict) -> dict:
    """A pick's settings, refused as the flags of the same names would be: only preference
    settings, each of its flag's type (an integer is a float's value too) and in its range
    (config.check_config, with the pick in place of the command line's preference flags)."""
    fields = {f.name for f in dataclasses.fields(PreferenceConfig)}
    if "method" not in settings:
        raise UsageError(f"{named} settings have no method")
    checked = {}
    for key, value in settings.items():
        if key not in fields:
            raise UsageError(
                f"{named} setting {key!r} is no preference setting (`python train.py --help` "
                "lists them under PreferenceConfig)"
            )
        kind = type(getattr(PreferenceConfig(), key))
        fits = type(value) is kind or (kind is float and type(value) is int)
        if not fits:
            raise UsageError(f"{named} {key} {value!r}: must be {kind.__name__}, as --{key} is")
        checked[key] = kind(value)
    if checked["method"] not in METHODS:
        raise UsageError(f"{named} method {checked['method']!r}: must be one of "
                         f"{', '.join(METHODS)}")
    try:
        check_config(with_method(cfg, checked))
    except UsageError as error:
        raise UsageError(f"{named} {error}") from None
    return checked


def tuned_seeds(where: str, picks: dict) -> list[int]:
    """The references a sweep's picks were judged on: the seeds of each pick's `validation`
    points ({"1000": {...}, ...}); none in a hand-written file."""
    seeds = set()
    for label, pick in picks.items():
        validation = pick.get("validation", {})
        if not (isinstance(validation, dict) and all(map(str.isdigit, validation))):
            raise UsageError(f"{where}: {label}'s 'validation' is not by reference seed")
        seeds |= set(map(int, validation))
    return sorted(seeds)


def check_tuned_on(cfg: LabConfig, where: str, tuned: list[int]) -> None:
    """Refuse to judge picks on a reference they were tuned on."""
    judged = compare_seeds(cfg)
    overlap = sorted(set(tuned) & set(judged))
    if overlap:
        raise UsageError(
            f"{where} was tuned on references {', '.join(map(str, tuned))}, and --compare's "
            f"(seeds {judged[0]}-{judged[-1]}) include {', '.join(map(str, overlap))}: picks "
            f"must be judged on other references; move --seed (--seed {max(tuned) + 1} clears "
            "them)"
        )


def compare(cfg: LabConfig, device) -> None:
    """Every row of compare_rows on each of --seeds references (whole pipelines of seeds
    --seed, --seed + 1, ...), judged on the test prompts: compare.md (mean and spread over the
    references, each reference's own numbers, and paired differences from FPO bootstrapped over
    references and prompts) and compare.json."""
    out = Path(cfg.run.out_dir)
    settings = compare_rows(cfg)
    seeds = compare_seeds(cfg)
    print(f"\n== compare: {', '.join(settings)} on {len(seeds)} references "
          f"(seeds {seeds[0]}-{seeds[-1]}) ==")
    started = time.time()
    rows, training = {}, {}  # tag: results; seed: the tags of its rows to train, in order

    def rows_of(ref_cfg: Config, inputs: dict) -> list[tuple]:
        seed = ref_cfg.run.seed
        tasks = []
        for label, overrides in settings.items():
            row_cfg = with_method(ref_cfg, overrides)
            tag = compare_tag(label, seed)
            # A row finished before an interruption counts only if made from this GPT, SAE and
            # data, with these training and judging settings (the picks may have changed).
            row_made_from = inputs | {
                "eval": dataclasses.asdict(cfg.eval),
                "settings": stage_settings(row_cfg, "prefer", seed),
            }
            saved = finished_row(row_cfg, tag, row_made_from) if cfg.run.resume else None
            if saved is not None:
                row_path = Path(ref_cfg.run.out_dir) / f"{tag}_results.json"
                print(f"compare: {label}, seed {seed}: finished earlier ({row_path}); skipped "
                      "(--resume)")
                rows[tag] = saved
            else:
                tasks.append((tag, compare_row, row_cfg, device, label, row_made_from))
        training[seed] = [tag for tag, *_ in tasks]
        return tasks

    made_from = {}  # seed: the inputs its rows were made from
    for (ref_cfg, inputs), results in references_and_runs(cfg, seeds, device, rows_of,
                                                          ROW_CONTINUE):
        made_from[str(ref_cfg.run.seed)] = inputs
        rows |= dict(zip(training[ref_cfg.run.seed], results))
    rows = [rows[compare_tag(label, seed)] for seed in seeds for label in settings]
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
        "threads": torch.get_num_threads(),
    }
    write_json(out / "compare.json", compare_json)
    print("\n" + table)
    first = Path(cfg.run.out_dir) / f"ref_seed{seeds[0]}"
    for label in settings:
        print(report.text_chart(label, first / f"{compare_tag(label, seeds[0])}_log.jsonl"))
    print(f"compare: wrote {out / 'compare.md'} and {out / 'compare.json'} | "
          f"{(time.time() - started) / 60:.1f} min")


ROW_CONTINUE = "rerun with --resume to continue it from its last saved step"


def finished_row(row_cfg: Config, tag: str, row_made_from: dict) -> dict | None:
    """A row's saved results, if made from exactly `row_made_from` and its policy, which
    --head_to_head and --bound read, is still that row's (a later --compare stopped midway may
    have retrained it); else None."""
    out = Path(row_cfg.run.out_dir)
    saved = saved_run(out / f"{tag}_results.json", row_made_from, needs=("feature_mse",))
    policy_path = out / f"{tag}.pt"
    if saved is not None:
        unlike = "it is gone"
        if policy_path.is_file():
            unlike = policy_unlike(policy_path, row_made_from)
        if unlike:
            print(f"{policy_path} is not its row's policy ({unlike}); running it again")
            return None
    return saved


def compare_row(row_cfg: Config, device, label: str, row_made_from: dict) -> dict:
    """One row on one reference: its policy trained (in a child process of its own unless
    --workers runs this in a worker already) and judged; saved as <tag>_results.json."""
    seed = row_cfg.run.seed
    tag = compare_tag(label, seed)
    with reference_kept(row_cfg):
        if row_cfg.experiment.workers > 1:
            cost = train.train_preference(row_cfg, device, seed, tag)
        else:
            cost = train_in_child(tag, ROW_CONTINUE, train.train_preference, row_cfg, device,
                                  seed, tag)
        samples = reference_samples(row_cfg)
        results = train.evaluate_policy(row_cfg, device, seed, tag, samples)
    results.update(
        label=label, median_step_ms=1000 * cost["median_step_s"], made_from=row_made_from
    )
    write_json(Path(row_cfg.run.out_dir) / f"{tag}_results.json", results)
    return results


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


# ----------------------------------------------------------------------------------------------
# --head_to_head: FPO's response judged against each other method's on the same prompt (the
# paper's Table 2 metric) at five temperatures (its Fig. 3-right), from --compare's policies

HEAD_TO_HEAD_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)


def head_to_head(cfg: LabConfig, device) -> None:
    """At each of HEAD_TO_HEAD_TEMPERATURES, every policy --compare trained answers its
    reference's test prompts once, and the judge compares FPO's response with each other
    method's on the same prompt; a tie counts half. Nothing is trained: the policies are those
    of compare.json's rows. Writes head_to_head.md (mean over references and prompts with a 95%
    bootstrap interval over both) and head_to_head.svg."""
    out = Path(cfg.run.out_dir)
    compare_json = read_compare(cfg)  # its shape and policies were checked at start-up
    labels = list(compare_json["settings"])
    seeds = sorted({row["seed"] for row in compare_json["rows"]})
    temperatures = HEAD_TO_HEAD_TEMPERATURES
    print(f"\n== head to head: FPO against {', '.join(labels[1:])} at temperatures "
          f"{', '.join(map(str, temperatures))}, on {len(seeds)} references ==")
    started = time.time()
    tasks = {}  # (seed, temperature): its task, side by side with --workers
    for seed in seeds:
        ref_cfg = reference_run(cfg, seed, device, made_by=COMPARE_RESUME)
        rows = {row["label"]: row["made_from"] for row in compare_json["rows"]
                if row["seed"] == seed}
        for temperature in temperatures:
            tasks[seed, temperature] = (f"head to head: seed {seed}, temperature {temperature}",
                                        judged_scores, ref_cfg, device, rows, temperature)
    # (seed, temperature): {label: the judge's score per test prompt}
    scores = dict(zip(tasks, run_all(cfg, list(tasks.values()), RERUN), strict=True))
    results = head_to_head_rates(scores, labels[1:], seeds, temperatures)
    n_prompts = len(scores[seeds[0], temperatures[0]]["FPO"])
    table = report.head_to_head_table(results, temperatures, seeds, n_prompts)
    figure = figures.head_to_head(results, len(seeds), n_prompts)
    write_outputs(out, "head_to_head", table, figure, started)


def head_to_head_rates(
    scores: dict, labels: list[str], seeds: list[int], temperatures: tuple[float, ...]
) -> dict[str, dict[float, tuple[float, float, float]]]:
    """{label: {temperature: (mean, low, high)}}: FPO's win rate against each row of `labels`,
    prompt by prompt (FPO's response wins when the judge scores it higher; a tie counts half),
    with its bootstrap interval over references and prompts. scores: {(seed, temperature):
    {label: the judge's score per test prompt}}, FPO's among them."""
    return {
        label: {
            temperature: bootstrap_mean([
                [win_rate([fpo], [other]) for fpo, other in zip(
                    scores[seed, temperature]["FPO"], scores[seed, temperature][label], strict=True
                )]
                for seed in seeds
            ])
            for temperature in temperatures
        }
        for label in labels
    }


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
    print(f"head to head: seed {seed}, temperature {temperature}", flush=True)
    reference, inputs = frozen_reference(ref_cfg, device)
    prompt_texts, _ = train.held_out_prompts(ref_cfg, inputs)
    prompts = encode_prompts(prompt_texts, inputs.enc, reference.config.block_size)
    scores = {}
    for label in rows:
        policy, _ = load_policy(
            ref_cfg, compare_tag(label, seed), reference, inputs.made_from, device
        )
        responses = sample_responses(policy, prompts, inputs.enc, eval_cfg, seed, device)
        scores[label] = judge_stats(prompt_texts, responses, inputs.enc)["scores"]
    write_json(path, {"scores": scores, "made_from": made_from,
                      "cpu_threads": torch.get_num_threads()})
    return scores
