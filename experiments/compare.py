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

import train
from config import Config, PreferenceConfig, stage_settings
from evaluate import encode_prompts, judge_stats, sample_responses, win_rate
from experiments import report
from experiments.common import (
    compare_tag, frozen_reference, inputs_made_from, reference_run, row_differences, saved_run,
    train_in_child, with_method, write_outputs,
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
    offline cache), else COMPARE_ROWS at --pref_steps. Picks tuned with other settings
    (pretraining, SAE, data, training or judging) are refused: they were tuned for another
    recipe."""
    path = Path(cfg.experiment.picks or Path(cfg.run.out_dir) / "sweep_picks.json")
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
            saved = None
            if cfg.run.resume:
                saved = saved_run(row_path, row_made_from, needs=("feature_mse",))
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
    write_json(path, {"scores": scores, "made_from": made_from})
    return scores
