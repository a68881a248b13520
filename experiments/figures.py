"""Every picture the experiments draw, with matplotlib.

STYLES is the one place a series gets its colour and marker: every figure reads it, so FPO looks
the same in every picture and no two series of one figure share a colour. Each function draws the
numbers its experiment's table prints (the same objects report.py formats as Markdown), with the
table's intervals as error bars or bands, round ticks (log axes where values span decades),
compared series on shared axes, a full legend, and a title that says which prompts and how many
references. It returns the Figure; `save` writes it, the same bytes on every rerun.
"""

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from runtime import write_atomically

matplotlib.rcParams.update({
    "svg.hashsalt": "fpo",  # the SVG's element ids, so a rerun writes the same file
    "svg.fonttype": "none",  # text stays text: smaller files that a search finds
    "font.size": 9,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "axes.axisbelow": True,
    "errorbar.capsize": 2.5,
})

STYLES = {  # series label: (colour, marker)
    # the methods of --sweep, --compare, --head_to_head and --bound
    "FPO": ("#1f77b4", "o"),
    "FPO at TDPO-2's KL": ("#17becf", "D"),
    "FPO (alpha=0)": ("#7f7f7f", "v"),
    "FPO (alpha=0) at FPO's pick": ("#bcbd22", "^"),
    "FPO-KL": ("#9467bd", "s"),
    "DPO": ("#d62728", "P"),
    "DPO (offline cache)": ("#8c564b", "X"),
    "SimPO": ("#ff7f0e", "<"),
    "TDPO-1": ("#e377c2", ">"),
    "TDPO-2": ("#2ca02c", "*"),
    "FPO along training": ("#393b79", "h"),
    # --ablation: FPO with one setting changed
    "stop-gradient on": ("#08519c", "o"),
    "stop-gradient off": ("#6baed6", "o"),
    "alpha scaled by 1/k": ("#a63603", "s"),
    "alpha fixed": ("#fd8d3c", "s"),
    # --control: FPO at its defaults (every w_i = 1) and weights on a chosen set of latents
    "w_i = 0 on the set": ("#e7298a", "v"),
    "w_i = W on the set": ("#1b9e77", "^"),
    # python -m experiments.runs --chart: one run's log
    "training log": ("#525252", ""),
}
# a tie, no change: a line to read the series against, not a series
REFERENCE_LINE = {"color": "black", "linewidth": 0.8, "linestyle": "--", "gid": "reference line"}


def style(label: str) -> dict:
    """matplotlib's keywords for one series: its colour and marker from STYLES, and its label."""
    if label not in STYLES:
        raise KeyError(f"{label!r} has no colour and marker in experiments/figures.py's STYLES")
    colour, marker = STYLES[label]
    return {"color": colour, "marker": marker, "label": label}


def new_figure(title: str, rows: int = 1, columns: int = 1, size=(7.0, 4.2), **share) -> tuple:
    """A Figure titled `title` with a rows x columns grid of axes (share: sharex, sharey)."""
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, **share)
    figure.suptitle(title)
    return figure, axes


def error_bars(axes, label: str, xs, ys, y_intervals=None, x_intervals=None, line=True,
               **keywords) -> None:
    """One series: its points (joined when `line`) with each interval, (low, high), drawn as an
    error bar around the point."""
    def spans(centres, intervals):
        if intervals is None:
            return None
        return [[c - low for c, (low, _) in zip(centres, intervals)],
                [high - c for c, (_, high) in zip(centres, intervals)]]

    axes.errorbar(xs, ys, yerr=spans(ys, y_intervals), xerr=spans(xs, x_intervals),
                  linestyle="-" if line else "none", markersize=5, **style(label) | keywords)


def band(axes, label: str, xs, ys, intervals) -> None:
    """One series along x: a line through the points and a band from each low to each high."""
    axes.plot(xs, ys, markersize=4, **style(label))
    axes.fill_between(xs, [low for low, _ in intervals], [high for _, high in intervals],
                      color=STYLES[label][0], alpha=0.15, linewidth=0, gid=f"{label} band")


def legend_outside(figure: Figure, axes) -> None:
    """Every series' full label, once, in rows of three below the panels."""
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False)


def plain_ticks(axis, values) -> None:
    """Ticks at exactly these values, written as plain numbers (16, 0.2, not 1.6e1)."""
    axis.set_major_locator(FixedLocator(list(values)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(NullLocator())


def log_axis(axis) -> None:
    """A log axis with ticks at the powers of ten only."""
    axis.set_major_locator(LogLocator(base=10))
    axis.set_minor_locator(LogLocator(base=10, subs=range(2, 10)))


def save(figure: Figure, path: Path) -> None:
    """Write the figure in `path`'s format (SVG, or PNG to look at), with no date in it, through
    runtime.write_atomically: a crash mid-write leaves the old file, never part of one."""
    kind = path.suffix.removeprefix(".")
    metadata = {"Date": None} if kind == "svg" else {"Software": None}
    write_atomically(path, lambda tmp: figure.savefig(tmp, format=kind, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# --sweep: the reward-KL frontier, and validity and win rate along training


def frontier(points: dict[str, list[dict]], n_references: int) -> Figure:
    """Judge score against KL from the reference at every grid point of every method: {label:
    [{"kl": (mean, low, high), "judge": (mean, low, high)}, ...]}, each the mean over the
    references and the range they span."""
    figure, axes = new_figure(
        "Reward-KL frontier: every (setting, steps) of the sweep\n"
        f"(validation prompts; mean over {n_references} references, bars: their range)",
        size=(8.0, 4.8),
    )
    ax = axes[0, 0]
    for label, series in points.items():
        error_bars(
            ax, label,
            [point["kl"][0] for point in series], [point["judge"][0] for point in series],
            y_intervals=[point["judge"][1:] for point in series],
            x_intervals=[point["kl"][1:] for point in series],
            line=False, elinewidth=0.5, alpha=0.8,
        )
    ax.set_xscale("log")
    log_axis(ax.xaxis)
    ax.set_xlabel("KL(policy || reference), nats (log scale)")
    ax.set_ylabel("judge score")
    legend_outside(figure, ax)
    return figure


def along_training(
    series: dict[str, list[tuple]], quantity: str, n_references: int
) -> Figure:
    """One quantity along training at each method's pick: {label: [(step, mean, (low, high)),
    ...]}, the mean over the references and the band they span."""
    figure, axes = new_figure(
        f"{quantity.capitalize()} along training, each method at its pick's setting\n"
        f"(validation prompts; mean over {n_references} references, band: their range)",
        size=(8.0, 4.5),
    )
    ax = axes[0, 0]
    steps = sorted({step for points in series.values() for step, _, _ in points})
    for label, points in series.items():
        band(ax, label, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points])
    plain_ticks(ax.xaxis, steps)
    ax.set_xlabel("preference training steps")
    ax.set_ylabel(quantity)
    legend_outside(figure, ax)
    return figure


# ----------------------------------------------------------------------------------------------
# --head_to_head


def head_to_head(
    results: dict[str, dict[float, tuple[float, float, float]]], n_references: int, n_prompts: int
) -> Figure:
    """FPO's head-to-head win rate against each method at each temperature, {label: {temperature:
    (mean, low, high)}}, with its 95% interval; the points of a temperature are spread a little
    sideways so that no interval hides another."""
    figure, axes = new_figure(
        "FPO's head-to-head win rate against each method, by sampling temperature\n"
        f"(test prompts: {n_prompts} on each of {n_references} references; 95% intervals)",
        size=(8.0, 4.5),
    )
    ax = axes[0, 0]
    temperatures = sorted({t for by_temperature in results.values() for t in by_temperature})
    step = min(b - a for a, b in zip(temperatures, temperatures[1:])) if len(temperatures) > 1 \
        else 1.0
    ax.axhline(0.5, **REFERENCE_LINE, label="a tie (0.5)")
    for i, (label, by_temperature) in enumerate(results.items()):
        shift = (i - (len(results) - 1) / 2) * 0.4 * step / max(len(results), 1)
        error_bars(
            ax, label,
            [t + shift for t in by_temperature], [mean for mean, _, _ in by_temperature.values()],
            y_intervals=[(low, high) for _, low, high in by_temperature.values()],
        )
    plain_ticks(ax.xaxis, temperatures)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("FPO's win rate (a tie counts half)")
    legend_outside(figure, ax)
    return figure


# ----------------------------------------------------------------------------------------------
# --ablation, --control, --bound


def ablation(
    panels: dict[str, dict[str, list[tuple[float, dict]]]], metrics: list[str], n_references: int
) -> Figure:
    """One column per varied setting, one row per metric, rows sharing their y axis: {setting
    ("alpha" or "k"): {series label: [(value, {metric: (mean, std)}), ...]}}, the mean ± standard
    deviation over the references of the ablation's table."""
    figure, axes = new_figure(
        "FPO with one setting changed: alpha with and without the stop-gradient, and k\n"
        f"(test prompts; mean ± std over {n_references} references)",
        rows=len(metrics), columns=len(panels), size=(8.5, 5.5), sharex="col", sharey="row",
    )
    for column, (setting, series) in enumerate(panels.items()):
        values = sorted({value for points in series.values() for value, _ in points})
        for row, metric in enumerate(metrics):
            ax = axes[row, column]
            for label, points in series.items():
                error_bars(
                    ax, label, [value for value, _ in points],
                    [numbers[metric][0] for _, numbers in points],
                    y_intervals=[(numbers[metric][0] - numbers[metric][1],
                                  numbers[metric][0] + numbers[metric][1])
                                 for _, numbers in points],
                )
            if values[0] == 0:  # alpha 0 on a log-like axis: linear up to the first non-zero
                ax.set_xscale("symlog", linthresh=values[1], linscale=0.5)
            else:
                ax.set_xscale("log", base=2)
            plain_ticks(ax.xaxis, values)
            ax.set_ylabel(metric if column == 0 else "")
        axes[-1, column].set_xlabel(setting)
        axes[-1, column].legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2,
                                frameon=False)
    return figure


def control(
    differences: dict[str, dict[str, tuple | None]],
    sets: list[str],
    uniform: str,
    n_references: int,
    n_prompts: int,
) -> Figure:
    """Each attribute's change against the reference (top row) and against FPO with uniform
    weights (bottom row), for every set of latents at weight 0 and W, all panels on one y axis:
    {row label: {"<attribute> - reference" or "<attribute> - uniform": (mean, low, high), or None
    where it does not apply}}; row labels are `uniform` and "<set>, w = 0", "<set>, w = W"."""
    attributes = ("positive", "on topic")
    figure, axes = new_figure(
        "Per-latent weights w_i on chosen sets of latents: attribute rates\n"
        f"(test prompts: {n_prompts} on each of {n_references} references; 95% intervals)",
        rows=2, columns=2, size=(8.5, 5.5), sharex=True, sharey=True,
    )
    positions = {name: i for i, name in enumerate(["FPO (every w_i = 1)"] + sets)}
    for row, against in enumerate(("reference", "uniform")):
        for column, attribute in enumerate(attributes):
            ax = axes[row, column]
            ax.axhline(0.0, **REFERENCE_LINE)
            key = f"{attribute} - {against}"
            series = {"FPO": [(0, differences[uniform][key])]}
            for weight, series_label in (("0", "w_i = 0 on the set"), ("W", "w_i = W on the set")):
                series[series_label] = [
                    (positions[name] + (0.12 if weight == "W" else -0.12),
                     differences[f"{name}, w = {weight}"][key])
                    for name in sets
                ]
            for label, points in series.items():
                points = [(x, cell) for x, cell in points if cell is not None]
                if points:
                    error_bars(ax, label, [x for x, _ in points], [c[0] for _, c in points],
                               y_intervals=[c[1:] for _, c in points], line=False)
            ax.set_title(f"{attribute} rate, policy - {against}"
                         + (" (FPO, every w_i = 1)" if against == "uniform" else ""))
    for ax in axes[-1]:
        ax.xaxis.set_major_locator(FixedLocator(list(positions.values())))
        ax.set_xticklabels([name.replace(" ", "\n", 1) for name in positions])
    legend_outside(figure, axes[0, 0])
    return figure


def bound(
    methods: dict[str, dict[str, tuple]], trajectory: list[tuple[int, dict]], n_references: int
) -> Figure:
    """D(y) against SeqKL(y) on held-out responses, log-log: each method's mean with its 95%
    interval on both axes ({label: {"SeqKL(y)": (mean, low, high), "D(y)": (...)}}), and FPO
    along its training ([(step, {...}), ...], the range over references)."""
    figure, axes = new_figure(
        "D(y) against SeqKL(y): each method, and FPO along its training\n"
        f"(held-out pairs' responses, {n_references} references; bars: 95% intervals, "
        "along training: the references' range)",
        size=(8.0, 4.8),
    )
    ax = axes[0, 0]
    for label, numbers in methods.items():
        kl, feature = numbers["SeqKL(y)"], numbers["D(y)"]
        error_bars(ax, label, [kl[0]], [feature[0]], y_intervals=[feature[1:]],
                   x_intervals=[kl[1:]], line=False)
    error_bars(
        ax, "FPO along training",
        [numbers["SeqKL(y)"][0] for _, numbers in trajectory],
        [numbers["D(y)"][0] for _, numbers in trajectory],
        y_intervals=[numbers["D(y)"][1:] for _, numbers in trajectory],
        x_intervals=[numbers["SeqKL(y)"][1:] for _, numbers in trajectory],
        zorder=1,  # under the methods' points: FPO's own sits on its last step
    )
    for step, numbers in trajectory:
        ax.annotate(f"step {step}", (numbers["SeqKL(y)"][0], numbers["D(y)"][0]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_axis(ax.xaxis)
    log_axis(ax.yaxis)
    ax.set_xlabel("SeqKL(y) = sum over the response of KL(ref || policy), nats")
    ax.set_ylabel("D(y), the feature MSE")
    legend_outside(figure, ax)
    return figure


# ----------------------------------------------------------------------------------------------
# python -m experiments.runs --chart: one preference run's log


def training_log(records: list[dict], keys: tuple[str, ...], title: str) -> Figure:
    """Each logged quantity along the steps of one run, one panel each on a shared step axis."""
    figure, axes = new_figure(title, rows=len(keys), size=(6.5, 1.6 * len(keys) + 0.6),
                              sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        ax.plot([r["step"] for r in records], [r[key] for r in records], linewidth=1,
                **style("training log") | {"label": key})
        ax.set_ylabel(key)
    axes[-1, 0].set_xlabel("step")
    return figure
