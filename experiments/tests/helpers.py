"""What the experiments' tests share: the tiny pipeline's first reference ready made, a stand-in
that fails the test when called, the command line as a subprocess, and readers of what a figure
draws and a table prints. The tiny pipeline config itself (TINY) and numbers_of are the core's, in
tests/helpers.py."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

import train
from experiments import figures

REPO = Path(train.__file__).parent
DOCS = REPO / "docs"
PACKAGE = REPO / "experiments"

# Judging on fewer, shorter samples than the tiny run's, for the tests of an experiment's
# bookkeeping (which rows, which files, what a rerun reuses) rather than of what it finds.
QUICK_JUDGE = ["--n_eval_prompts", "8", "--max_new_tokens", "12"]


def tiny_reference(tiny_run, out_dir: Path, seed: int = 1337) -> Path:
    """out_dir/ref_seed<seed>/ holding the tiny run's GPT, SAE and cache: the reference an
    experiment builds for that seed (the tiny run is seed 1337), ready made."""
    reference = out_dir / f"ref_seed{seed}"
    reference.mkdir(parents=True)
    for name in ("gpt.pt", "sae.pt", "reference_cache.pt"):
        shutil.copy(tiny_run[0] / name, reference / name)
    return reference


def fail_if_called(what: str):
    return lambda *args, **kwargs: pytest.fail(what)


def read(path: Path):
    return json.loads(path.read_text())


def record_figures(monkeypatch) -> dict:
    """{file name: Figure} of every figure the experiments save from now on (figures.save, which
    still writes each file)."""
    saved = {}
    save = figures.save

    def recording(figure, path):
        saved[path.name] = figure
        save(figure, path)

    monkeypatch.setattr(figures, "save", recording)
    return saved


def drawn(figure) -> dict[tuple[int, str], dict]:
    """What a figures.py Figure shows: {(panel, series label): {"colour", "x", "y", "y_bars",
    "x_bars", "band"}} for every series of every panel (panels in reading order), its points,
    each point's error bar (low, high) on each axis where it has one, and its band's (low, high)
    at each x where it has one."""
    shown = {}
    for panel, axes in enumerate(figure.axes):
        for container in axes.containers:
            line, _, bar_collections = container.lines
            series = {"colour": to_hex(line.get_color()), "x": list(line.get_xdata()),
                      "y": list(line.get_ydata()), "y_bars": None, "x_bars": None, "band": None}
            # matplotlib draws the x bars first, then the y bars
            axes_of_bars = ["x"] * container.has_xerr + ["y"] * container.has_yerr
            for axis, bars in zip(axes_of_bars, bar_collections, strict=True):
                index = 0 if axis == "x" else 1
                series[f"{axis}_bars"] = [
                    (min(s[0][index], s[1][index]), max(s[0][index], s[1][index]))
                    for s in bars.get_segments()
                ]
            shown[panel, container.get_label()] = series
        for line in axes.get_lines():
            if not line.get_label().startswith("_") and line.get_gid() != "reference line":
                shown[panel, line.get_label()] = {
                    "colour": to_hex(line.get_color()), "x": list(line.get_xdata()),
                    "y": list(line.get_ydata()), "y_bars": None, "x_bars": None, "band": None,
                }
        for collection in axes.collections:
            gid = collection.get_gid() or ""
            if gid.endswith(" band"):
                vertices = collection.get_paths()[0].vertices
                series = shown[panel, gid.removesuffix(" band")]
                series["band"] = [
                    (min(y for vx, y in vertices if math.isclose(vx, x)),
                     max(y for vx, y in vertices if math.isclose(vx, x)))
                    for x in series["x"]
                ]
    return shown


def table_rows(markdown: str, first_cell: str, after: str = "") -> dict[str, dict[str, str]]:
    """The first Markdown table of `markdown` (after its first line that holds `after`) whose
    header starts with `first_cell`: {row label: {column: cell}}. A first_cell "a | b" (several
    first columns) joins the row's first cells likewise."""
    lines = markdown.splitlines()
    begin = next(i for i, line in enumerate(lines) if after in line)
    start = next(i for i, line in enumerate(lines)
                 if i >= begin and line.startswith(f"| {first_cell} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split(" | ")]
    n_first = len(first_cell.split(" | "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows[" | ".join(cells[:n_first])] = dict(zip(header[n_first:], cells[n_first:]))
    return rows


def cell_numbers(cell: str) -> list[float]:
    """Every number in a table cell: '0.802 [0.695, 0.908]' -> [0.802, 0.695, 0.908]; '0.759 ±
    0.023' -> [0.759, 0.023]."""
    return [float(number) for number in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]


def close(drawn_value: float, printed: float, relative: bool = False, digits: int = 1) -> bool:
    """A drawn number against the table's printed one (the sum of `digits` printed numbers): 3
    decimals each, or 2 to 3 significant digits."""
    if relative:
        return math.isclose(drawn_value, printed, rel_tol=0.05)
    return math.isclose(drawn_value, printed, abs_tol=digits * 5e-4 + 1e-9)


def assert_points(series: dict, cells: list[str], axis: str = "y", relative: bool = False):
    """The series' points on `axis` and their error bars are the cells' 'mean [low, high]'."""
    bars = series[f"{axis}_bars"]
    for i, cell in enumerate(cells):
        mean, low, high = cell_numbers(cell)
        assert close(series[axis][i], mean, relative), (series[axis][i], cell)
        assert close(bars[i][0], low, relative) and close(bars[i][1], high, relative), cell


def assert_one_colour_per_series(figure) -> None:
    """Every series of the figure has its STYLES colour, and no two of its series share one."""
    colours = {}
    for (_, label), series in drawn(figure).items():
        assert series["colour"] == figures.STYLES[label][0], label
        colours[label] = series["colour"]
    assert len(set(colours.values())) == len(colours), colours


def run_module(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess from the repository root: its exit code and
    output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
