"""The experiments' results as text: Markdown tables and text charts (figures.py draws the
pictures from the same numbers).

Standard library only, and no computing: every function formats numbers it is given.
"""

import json
import math
import statistics
from pathlib import Path


def nested(results: dict, path: tuple):
    """results[path[0]][path[1]]..., or NaN where a key is missing."""
    for key in path:
        results = results.get(key, float("nan")) if isinstance(results, dict) else float("nan")
    return results


# ----------------------------------------------------------------------------------------------
# Markdown tables


def mean_and_spread(values: list[float], digits: int) -> str:
    """'mean ± standard deviation' of the values; the mean alone for a single value."""
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def compare_table(
    rows: list[dict],
    labels: list[str],
    columns: dict,
    seeds: list[int],
    differences: dict[str, tuple[float, float, float]],
    first_column: str = "method",
) -> str:
    """Markdown: one row per method (or setting: `first_column`), mean ± standard deviation over
    the references (seeds) of each column ({name: (results key path, digits)}); each reference's
    win rate and valid rate per method; then paired differences in win rate, {"A - B": (mean,
    low, high)}, each with its 95% bootstrap interval over references and prompts."""
    lines = [f"| {first_column} | {' | '.join(columns)} |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for label in labels:
        cells = []
        for path, digits in columns.values():
            values = [float(nested(row, path)) for row in rows if row["label"] == label]
            cells.append(mean_and_spread(values, digits))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append(
        f"\nMean ± standard deviation over {len(seeds)} reference(s): seeds "
        f"{', '.join(map(str, seeds))}, each a whole pipeline (its own pretrained GPT, SAE, "
        "cache and pairs).\n"
    )
    if not differences:
        return "\n".join(lines)
    lines += [
        "Win rate / valid rate on each reference:\n",
        f"| method | {' | '.join(f'seed {seed}' for seed in seeds)} |",
        "|---" * (len(seeds) + 1) + "|",
    ]
    for label in labels:
        by_seed = {row["seed"]: row for row in rows if row["label"] == label}
        cells = [
            f"{by_seed[seed]['win_rate']:.3f} / {by_seed[seed]['policy']['valid_rate']:.3f}"
            for seed in seeds
        ]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    n_prompts = len(next(row["prompt_wins"] for row in rows if "prompt_wins" in row))
    return "\n".join(lines) + "\n\n" + difference_table(differences, len(seeds), n_prompts)


def difference_table(
    differences: dict[str, tuple[float, float, float]], n_references: int, n_prompts: int
) -> str:
    """Markdown: paired differences in win rate, {"A - B": (mean, low, high)}, each with its 95%
    bootstrap interval over references and prompts."""
    lines = ["| win rate difference | mean | 95% interval |", "|---|---|---|"]
    for label, (mean, low, high) in differences.items():
        lines.append(f"| {label} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] |")
    lines.append(
        f"\nPaired: on each of the {n_references} reference(s) every method answers the same "
        f"{n_prompts} test prompts; the interval is a bootstrap over references, then over "
        "prompts within each.\n"
    )
    return "\n".join(lines)


def interval_cell(cell, digits: str) -> str:
    """One cell of an interval_table: (mean, low, high) -> 'mean [low, high]' in the column's
    format ('+.3f' -> '+0.260 [+0.214, +0.305]'); a string as it is; None as '-'."""
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return cell
    mean, low, high = cell
    return f"{mean:{digits}} [{low:{digits}}, {high:{digits}}]"


def interval_table(
    first_column: str, rows: dict[str, dict], formats: dict[str, str], note: str
) -> str:
    """Markdown: one row per label of `rows` ({label: {column: (mean, low, high), a string or
    None}}), each column in its format of `formats` ({column: format}), then `note`."""
    lines = [f"| {first_column} | {' | '.join(formats)} |", "|---" * (len(formats) + 1) + "|"]
    for label, cells in rows.items():
        shown = [interval_cell(cells[column], digits) for column, digits in formats.items()]
        lines.append(f"| {label} | {' | '.join(shown)} |")
    return "\n".join(lines) + f"\n\n{note}\n"


def control_table(
    differences: dict[str, dict], targets: dict[str, str], n_references: int, n_prompts: int
) -> str:
    """Markdown: each --control row's positive and on-topic changes against the reference and
    against FPO with every w_i = 1 (paper.attribute_differences), and the attribute its set
    targets (targets: {set: attribute}; a row is "<set>, w = ...")."""
    rows = {
        label: {"targets": targets.get(label.split(", w = ")[0], "-")} | cells
        for label, cells in differences.items()
    }
    columns = ["positive - reference", "positive - uniform", "on topic - reference",
               "on topic - uniform"]
    return interval_table(
        "FPO with", rows, {"targets": ""} | {column: "+.3f" for column in columns},
        f"The judge's positive (on-topic) fraction of each response, the policy's minus the "
        f"reference's or minus that of FPO with every w_i = 1 (uniform), on the same "
        f"{n_prompts} test prompts of each of {n_references} reference(s): the mean and its 95% "
        "bootstrap interval over references, then prompts within each.",
    )


def sweep_report(picks: dict, references: dict, validity_floor: float) -> str:
    """Markdown: the references, the pick rule, and each method's pick with its validation
    numbers on every reference (seed: point), so the spread shows."""
    seeds = list(references)
    lines = ["The references on the validation prompts:\n",
             "| seed | judge score | valid | on topic | positive |", "|---|---|---|---|---|"]
    for seed, reference in references.items():
        lines.append(
            f"| {seed} | {reference['judge_score']:.3f} | {reference['valid_rate']:.3f} | "
            f"{reference['on_topic_rate']:.3f} | {reference['positive_rate']:.3f} |"
        )
    lines += [
        "",
        f"The pick rule: among the (setting, steps) points whose valid rate is at least "
        f"{validity_floor:g}x each reference's own on all {len(seeds)} references, the highest "
        "worst-case judge score over them. Per reference (seeds "
        f"{', '.join(map(str, seeds))}), in that order:\n",
        "| method | settings tried | picked setting | steps | worst judge score | judge score | "
        "valid | win rate | KL from ref | on the grid's edge |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, pick in picks.items():
        setting = ", ".join(
            f"{key} {value:g}"
            for key, value in pick["settings"].items()
            if key not in ("method", "pref_steps")
        )
        points = [pick["validation"][str(seed)] for seed in seeds]
        worst = min(point["judge_score"] for point in points)
        cells = [
            " / ".join(f"{point[key]:.{digits}f}" for point in points)
            for key, digits in (
                ("judge_score", 3), ("valid_rate", 3), ("win_rate", 3), ("kl_from_reference", 2)
            )
        ]
        edges = ", ".join(pick["edges"]) or "no (interior)"
        lines.append(
            f"| {label} | {pick['settings_tried']} | {setting} | {pick['settings']['pref_steps']} "
            f"| {worst:.3f} | {' | '.join(cells)} | {edges} |"
        )
    lines.append(
        "\nOn the grid's edge: along the grid's line through the pick (its other knobs held), "
        "the pick holds the smallest or largest value of pref_lr, beta, alpha or gamma; or it is "
        "the first or last judged step. Below the first judged step lies only the reference "
        "itself (0 steps); the last is the sweep's length budget, twice --pref_steps for every "
        "method, a limit this sweep does not extend."
    )
    return "\n".join(lines) + "\n"


def sweep_points(frontier: dict, along: dict, n_references: int) -> str:
    """Markdown: every number the sweep's figures draw, each the mean over the references [the
    smallest, the largest]: each method at its pick along training (validity.svg, win_rate.svg;
    along: {"valid_rate" or "win_rate": {label: [(step, mean, (min, max)), ...]}}), then every
    grid point (frontier.svg; frontier: {label: [{"setting", "steps", "kl", "judge"}, ...]})."""
    picked = {
        f"{label} | {step}": {"valid": (valid, *valid_range), "win rate": (win, *win_range)}
        for label, points in along["valid_rate"].items()
        for (step, valid, valid_range), (_, win, win_range) in zip(points, along["win_rate"][label])
    }
    grid = {
        f"{label} | {point['setting']} | {point['steps']}": {
            "KL from ref": point["kl"], "judge score": point["judge"]
        }
        for label, points in frontier.items()
        for point in points
    }
    about = (f"Validation prompts: the mean over {n_references} reference(s) [the smallest, the "
             "largest].")
    return (
        "### Each method at its pick, along training (validity.svg, win_rate.svg)\n\n"
        + interval_table("method | steps", picked, {"valid": ".3f", "win rate": ".3f"}, about)
        + "\n### Every grid point (frontier.svg)\n\n"
        + interval_table("method | setting | steps", grid,
                         {"KL from ref": ".3g", "judge score": ".3f"}, about)
    )


def head_to_head_table(
    results: dict[str, dict[float, tuple[float, float, float]]],
    temperatures: tuple[float, ...],
    seeds: list[int],
    n_prompts: int,
) -> str:
    """Markdown: FPO's head-to-head win rate against each method ({label: {temperature: (mean,
    low, high)}}) at every temperature, and at how many temperatures its interval lies above
    0.5 (FPO better) or below it (FPO worse)."""
    header = " | ".join(f"T = {temperature:g}" for temperature in temperatures)
    lines = [
        f"| FPO against | {header} | above 0.5 | below 0.5 |",
        "|---" * (len(temperatures) + 3) + "|",
    ]
    for label, by_temperature in results.items():
        cells = [
            f"{mean:.3f} [{low:.3f}, {high:.3f}]" for mean, low, high in by_temperature.values()
        ]
        above = sum(low > 0.5 for _, low, _ in by_temperature.values())
        below = sum(high < 0.5 for _, _, high in by_temperature.values())
        lines.append(
            f"| {label} | {' | '.join(cells)} | {above} of {len(temperatures)} | "
            f"{below} of {len(temperatures)} |"
        )
    lines.append(
        f"\nFPO's response judged against the other method's on the same test prompt (a tie "
        f"counts half): the mean over {len(seeds)} reference(s) (seeds "
        f"{', '.join(map(str, seeds))}) and {n_prompts} prompts each, with a 95% bootstrap "
        "interval over references, then prompts within each.\n"
    )
    return "\n".join(lines)


def bound_table(summary: dict[str, dict], constants: dict[int, float]) -> str:
    """Markdown: per method, how often the per-token bound holds, the quantiles of KL / bound,
    and the three Spearman correlations with their 95% intervals (paper.bound_summary)."""
    def interval(mean: float, low: float, high: float) -> str:
        return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"

    lines = [
        "| method | KL_t <= M dc_t^2 | KL_t / (M dc_t^2): 5% | 50% | 95% | KL_t / (dz_t^2 / 4): "
        "50% | Spearman: KL_t, dc_t^2 | SeqKL(y), D(y) | SeqKL margin, D margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in summary.items():
        quantiles = " | ".join(f"{q:.2g}" for q in row["ratio quantiles"])
        correlations = " | ".join(interval(*row[key]) for key in ("token", "response", "margin"))
        lines.append(
            f"| {label} | {row['holds']:.3f} | {quantiles} | {row['softmax step']:.2g} | "
            f"{correlations} |"
        )
    constants_text = ", ".join(f"seed {seed}: {m:.3g}" for seed, m in constants.items())
    lines.append(
        f"\nM per reference ({constants_text}). KL_t = KL(pi_ref || pi_theta) at a position that "
        "generates a response token, dc_t^2 = the squared distance of the SAE codes of the two "
        "residual streams there, dz_t^2 that of the two logit vectors; margins: rejected minus "
        "chosen. Intervals: bootstrap over "
        "references, then positions, responses or pairs within each.\n"
    )
    return "\n".join(lines)


def trajectory_table(trajectory: list[tuple[int, dict]], n_references: int) -> str:
    """Markdown: FPO's mean SeqKL(y) and D(y) on held-out responses at each measured step, the
    mean over the references and their range ([(step, {"SeqKL(y)": (mean, min, max), "D(y)":
    (...)}), ...])."""
    return interval_table(
        "FPO at step", {str(step): cells for step, cells in trajectory},
        {"SeqKL(y)": ".3g", "D(y)": ".2g"},
        "FPO trained once more at its pick on each reference, both measured on the held-out "
        f"pairs' responses at every fifth of its steps: the mean over {n_references} "
        "reference(s) [the smallest, the largest].",
    )


RUN_COLUMNS = {  # column: (results key path, digits)
    "win rate": (("win_rate",), 3),
    "valid": (("policy", "valid_rate"), 3),
    "reference valid": (("reference", "valid_rate"), 3),
    "judge score": (("policy", "judge_score"), 3),
    "reference judge score": (("reference", "judge_score"), 3),
    "reference on topic": (("reference", "on_topic_rate"), 3),
    "reference positive": (("reference", "positive_rate"), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
    "minutes": (("seconds", "total"), 1),
}


def runs_table(names: list[str], runs: list[dict]) -> str:
    """Markdown: one row per finished run (its results.json, named by its directory), then the
    mean ± standard deviation of every column over the runs that have it. `-`: no value (a run on
    your own data has no judge: no win rate, valid or judge score). minutes: the stages that
    wrote the results.json ran (all five for a whole `python train.py`)."""
    runs = [run | {"seconds": {"total": run_minutes(run)}} for run in runs]
    header = f"| run | seed | threads | {' | '.join(RUN_COLUMNS)} |"
    lines = [header, "|---" * (len(RUN_COLUMNS) + 3) + "|"]
    for name, run in zip(names, runs):
        cells = [table_cell(cell) for cell in (name, run["seed"], run["cpu_threads"])]
        cells += [number_cell(nested(run, path), digits) for path, digits in RUN_COLUMNS.values()]
        lines.append(f"| {' | '.join(cells)} |")
    spread = []
    for path, digits in RUN_COLUMNS.values():
        values = [nested(run, path) for run in runs]
        shown = [value for value in values if finite_number(value)]
        spread.append(mean_and_spread(shown, digits) if shown else "-")
    return "\n".join(lines + [f"| mean ± std | | | {' | '.join(spread)} |"]) + "\n"


def run_minutes(run: dict) -> float:
    """The minutes the stages of a results.json took, from its "seconds" ({stage: seconds}); NaN
    (shown `-`) when it records none."""
    seconds = run.get("seconds")
    stages = list(seconds.values()) if isinstance(seconds, dict) else []
    recorded = stages and all(finite_number(stage) for stage in stages)
    return sum(stages) / 60 if recorded else math.nan


def finite_number(value) -> bool:
    """Whether a table shows value as a number: an int or float below 1e300 in size (NaN, inf, a
    string or a list is `-`; the bound keeps every standard deviation of such values a float)."""
    return isinstance(value, (int, float)) and abs(value) < 1e300


def number_cell(value, digits: int) -> str:
    """value with `digits` decimals, or `-` where the run has no number for the column."""
    return f"{value:.{digits}f}" if finite_number(value) else "-"


def table_cell(value) -> str:
    """value as one Markdown table cell: `a|b` -> `a\\|b`, a backslash doubled and a line break
    made a space, so no directory name can shift the columns or end the row."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.splitlines())


# ----------------------------------------------------------------------------------------------
# Training logs as text


TRAINING_LOG_KEYS = ("loss", "margin", "accuracy", "feature_mse")


def read_log(log_path: Path) -> list[dict]:
    """A preference training log: one JSON record per step."""
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def text_chart(label: str, log_path: Path, width: int = 60) -> str:
    """The reward margin and D(y) (feature_mse) over training, one row of block characters each: the
    steps are split into at most `width` equal spans, and each character is its span's mean."""
    records = read_log(log_path)
    lines = [f"{label}: {len(records)} steps"]
    for key in ("margin", "feature_mse"):
        values = [r[key] for r in records]
        n_spans = min(width, len(values))
        spans = [
            values[i * len(values) // n_spans : (i + 1) * len(values) // n_spans]
            for i in range(n_spans)
        ]
        means = [sum(span) / len(span) for span in spans]
        low, high = min(means), max(means)
        levels = [round(8 * (m - low) / (high - low)) if high > low else 4 for m in means]
        bars = "".join(" ▁▂▃▄▅▆▇█"[level] for level in levels)
        lines.append(f"  {key:<13} {low:>9.4g} {bars} {high:.4g}")
    return "\n".join(lines)
