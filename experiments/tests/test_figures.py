"""experiments/figures.py: every figure draws the numbers its table prints, intervals included, and
every series takes its colour and marker from the one mapping, STYLES, none shared in a figure.
Made-up numbers here; test_experiments.py checks the same on the figures of real tiny runs."""

import random
import re

import config
from experiments import compare, figures, paper, report, sweep
from experiments.tests.helpers import (
    PACKAGE, assert_one_colour_per_series, assert_points, cell_numbers, close, drawn, table_rows,
)

RANDOM = random.Random(0)
TEMPERATURES = (0.2, 0.6, 1.0)
METHODS = ["FPO (alpha=0)", "DPO", "TDPO-2"]
SETS = list(paper.CONTROL_TARGETS)


def interval(low: float = 0.0, high: float = 1.0) -> tuple[float, float, float]:
    mean = RANDOM.uniform(low, high)
    return mean, mean - RANDOM.uniform(0.01, 0.1) * abs(mean), mean + RANDOM.uniform(0.01, 0.1)


# ---- each figure, drawn from the numbers its table prints ------------------------------------


def test_head_to_head_draws_its_table():
    results = {label: {t: interval(0.4, 0.9) for t in TEMPERATURES} for label in METHODS}
    table = table_rows(report.head_to_head_table(results, TEMPERATURES, [1, 2], 24), "FPO against")
    figure = figures.head_to_head(results, n_references=2, n_prompts=24)
    shown = drawn(figure)
    for label in METHODS:
        assert_points(shown[0, label], [table[label][f"T = {t:g}"] for t in TEMPERATURES])
    assert_one_colour_per_series(figure)
    assert "test prompts: 24 on each of 2 references" in figure.get_suptitle()


def test_control_draws_its_table_against_the_reference_and_against_uniform_weights():
    labels = [paper.UNIFORM] + [f"{name}, w = {w}" for name in SETS for w in ("0", "W")]
    differences = {
        label: {f"{attribute} - {against}": None if (label, against) == (paper.UNIFORM, "uniform")
                else interval(-0.3, 0.3)
                for attribute in ("positive", "on topic") for against in ("reference", "uniform")}
        for label in labels
    }
    table = table_rows(report.control_table(differences, paper.CONTROL_TARGETS, 3, 24), "FPO with")
    assert table["positive latents, w = W"]["targets"] == "positive"
    assert table[paper.UNIFORM]["positive - uniform"] == "-"
    figure = figures.control(differences, SETS, paper.UNIFORM, n_references=3, n_prompts=24)
    shown = drawn(figure)
    panels = [("positive", "reference"), ("on topic", "reference"), ("positive", "uniform"),
              ("on topic", "uniform")]
    for panel, (attribute, against) in enumerate(panels):
        column = f"{attribute} - {against}"
        if against == "reference":
            assert_points(shown[panel, "FPO"], [table[paper.UNIFORM][column]])
        else:
            assert (panel, "FPO") not in shown  # FPO against itself: nothing to draw
        for weight, series in (("0", "w_i = 0 on the set"), ("W", "w_i = W on the set")):
            assert_points(shown[panel, series],
                          [table[f"{name}, w = {weight}"][column] for name in SETS])
    assert_one_colour_per_series(figure)


def test_bound_draws_its_two_tables():
    means = {label: {"SeqKL(y)": interval(0.5, 20), "D(y)": interval(1e-5, 1e-1)}
             for label in ["FPO"] + METHODS}
    trajectory = [(step, {"SeqKL(y)": interval(0.3, 6), "D(y)": interval(1e-5, 2e-4)})
                  for step in (10, 20, 30)]
    table = table_rows(report.interval_table("method", means, {"SeqKL(y)": ".3g", "D(y)": ".2g"},
                                             ""), "method")
    along = table_rows(report.trajectory_table(trajectory, 2), "FPO at step")
    figure = figures.bound(means, trajectory, n_references=2)
    shown = drawn(figure)
    for label in means:
        assert_points(shown[0, label], [table[label]["SeqKL(y)"]], axis="x", relative=True)
        assert_points(shown[0, label], [table[label]["D(y)"]], relative=True)
    fpo_along = shown[0, "FPO along training"]
    assert_points(fpo_along, [along[str(step)]["SeqKL(y)"] for step, _ in trajectory], axis="x",
                  relative=True)
    assert_points(fpo_along, [along[str(step)]["D(y)"] for step, _ in trajectory], relative=True)
    assert_one_colour_per_series(figure)


def test_sweep_figures_draw_sweep_points():
    steps = (2, 4, 6)
    frontier = {
        label: [{"setting": f"beta {beta}", "steps": step, "kl": interval(0.1, 50),
                 "judge": interval(0.2, 0.8)} for beta in (1, 2) for step in steps]
        for label in METHODS
    }
    along = {key: {label: [(step, mean, (low, high))
                           for step in steps for mean, low, high in [interval()]]
                   for label in METHODS}
             for key in ("valid_rate", "win_rate")}
    text = report.sweep_points(frontier, along, 2)
    picked = table_rows(text, "method | steps")
    grid = table_rows(text, "method | setting | steps")
    figure = figures.frontier(frontier, n_references=2)
    shown = drawn(figure)
    for label, points in frontier.items():
        cells = [grid[f"{label} | {p['setting']} | {p['steps']}"] for p in points]
        assert_points(shown[0, label], [cell["judge score"] for cell in cells])
        assert_points(shown[0, label], [cell["KL from ref"] for cell in cells], axis="x",
                      relative=True)
    assert_one_colour_per_series(figure)
    for key, column in (("valid_rate", "valid"), ("win_rate", "win rate")):
        figure = figures.along_training(along[key], column, n_references=2)
        shown = drawn(figure)
        for label in METHODS:
            series = shown[0, label]
            assert series["x"] == list(steps)
            for i, step in enumerate(steps):
                mean, low, high = cell_numbers(picked[f"{label} | {step}"][column])
                assert close(series["y"][i], mean)
                assert close(series["band"][i][0], low) and close(series["band"][i][1], high)
        assert_one_colour_per_series(figure)


def test_ablation_draws_the_mean_and_spread_of_its_alpha_and_k_tables():
    cfg = config.Config()
    tables = paper.ablation_rows(cfg)
    rows = {
        table: [
            {"label": label, "seed": seed, "win_rate": RANDOM.random(),
             "reward_accuracy": 0.9, "train_reward_accuracy": 0.9,
             "policy": {"valid_rate": RANDOM.random(), "entropy_per_token": 1.5,
                        "kl_from_reference": 1.0, "mean_length": 7.0}}
            for label in changes for seed in (1, 2, 3)
        ]
        for table, changes in tables.items()
    }
    figure = figures.ablation(paper.ablation_panels(rows, tables), list(paper.ABLATION_FIGURE), 3)
    shown = drawn(figure)
    # panels in reading order: (win rate, alpha), (win rate, k), (valid, alpha), (valid, k)
    for table, column in (("alpha", 0), ("FPO's k", 1)):
        name = next(name for name in tables if name.startswith(table))
        printed = table_rows(
            report.compare_table(rows[name], list(tables[name]), paper.ABLATION_COLUMNS, [1, 2, 3],
                                 {}, "setting"),
            "setting",
        )
        for row, metric in enumerate(paper.ABLATION_FIGURE):
            series = {label: shown[2 * row + column, label]
                      for (panel, label) in shown if panel == 2 * row + column}
            n_points = 0
            for label, changed in tables[name].items():
                mean, spread = cell_numbers(printed[label][metric])
                if table == "alpha":
                    line = series[label.split(", ")[1]]
                    i = line["x"].index(changed["alpha"])
                else:
                    scaled = label.endswith("(scaled)")
                    line = series["alpha scaled by 1/k" if scaled else "alpha fixed"]
                    i = line["x"].index(changed["fpo_k"])
                assert close(line["y"][i], mean)
                assert close(line["y_bars"][i][0], mean - spread, digits=2)
                assert close(line["y_bars"][i][1], mean + spread, digits=2)
                n_points += 1
            assert n_points == sum(len(line["x"]) for line in series.values())
    assert_one_colour_per_series(figure)


# ---- one mapping of series to colour and marker ----------------------------------------------


def test_the_colour_and_marker_of_every_series_has_one_source():
    # Every method an experiment can label has its own colour, and so has every other series.
    methods = {*compare.COMPARE_ROWS, *sweep.SWEEP_GRIDS, sweep.MATCHED_KL,
               "FPO (alpha=0) at FPO's pick", "FPO along training"}
    assert methods <= set(figures.STYLES)
    colours = [colour for colour, _ in figures.STYLES.values()]
    assert len(set(colours)) == len(colours)
    # ... and none is written anywhere else: figures.py alone imports matplotlib or names a colour.
    for path in PACKAGE.glob("*.py"):
        if path.name == "figures.py":
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) matplotlib", text, flags=re.M), path.name
        assert not re.search(r"['\"]#[0-9a-fA-F]{3,6}['\"]|\bcolou?r=", text), path.name
