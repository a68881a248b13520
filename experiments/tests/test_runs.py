"""`python -m experiments.runs OUT_DIR...`: the per-seed table of finished runs (and with --chart
each run's training picture), and the command line's promise: a bad directory or results.json is
one `error:` line and exit code 2, never a traceback.

Most tests run the command in this process, as its `__main__` guard does (config.run_command), so
an exception that escapes it fails the test; those marked `slow` start `python -m
experiments.runs`.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from config import run_command
from experiments import report, runs
from experiments.tests.helpers import DOCS, REPO, record_figures, run_module

HEADER = (
    "| run | seed | threads | win rate | valid | reference valid | judge score | "
    "reference judge score | reference on topic | reference positive | KL from ref | minutes |"
)


def complete_results(seed: int = 1337, win_rate: float = 0.72) -> dict:
    """A results.json of a toy-world run: every key report.RUN_COLUMNS reads, seed, cpu_threads
    and seconds (210 s in all: 3.5 minutes)."""
    return {
        "method": "fpo",
        "seed": seed,
        "cpu_threads": 2,
        "win_rate": win_rate,
        "policy": {"valid_rate": 0.99, "judge_score": 0.745, "kl_from_reference": 1.4},
        "reference": {
            "valid_rate": 0.995,
            "judge_score": 0.555,
            "on_topic_rate": 0.554,
            "positive_rate": 0.458,
        },
        "seconds": {"pretrain": 120, "sae": 60, "eval": 30},
    }


def unjudged_results(seed: int = 2) -> dict:
    """A results.json of a run on the user's own pairs: no judge, so no win rate, validity, judge
    score, on-topic or positive rates."""
    return {
        "method": "fpo",
        "seed": seed,
        "cpu_threads": 2,
        "policy": {"kl_from_reference": 1.1},
        "reference": {"kl_from_reference": 0.0},
        "seconds": {"prefer": 30},
    }


def run_dir(parent: Path, name: str, results) -> Path:
    """parent/name holding `results` as its results.json."""
    out_dir = parent / name
    out_dir.mkdir()
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return out_dir


def runs_here(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python -m experiments.runs ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["runs.py", *args])
    code = 0
    try:
        run_command(runs.main)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, named: str) -> None:
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0], (named, err)


# Each bad input: (the OUT_DIR arguments, the text the error line must name), made in tmp_path.
def no_arguments(tmp: Path):
    return [], "OUT_DIR"


def missing_directory(tmp: Path):
    return [str(tmp / "never_ran")], str(tmp / "never_ran")


def empty_directory(tmp: Path):
    (tmp / "run").mkdir()
    return [str(tmp / "run")], str(tmp / "run" / "results.json")


def file_instead_of_directory(tmp: Path):
    (tmp / "results.json").write_text(json.dumps(complete_results()))
    return [str(tmp / "results.json")], str(tmp / "results.json")


def results_text(text: str):
    """A maker of a run directory whose results.json holds `text`."""

    def make(tmp: Path):
        (tmp / "run").mkdir()
        (tmp / "run" / "results.json").write_text(text)
        return [str(tmp / "run")], str(tmp / "run" / "results.json")

    return make


def results_is_a_directory(tmp: Path):
    (tmp / "run" / "results.json").mkdir(parents=True)
    return [str(tmp / "run")], str(tmp / "run" / "results.json")


def good_run_then_missing(tmp: Path):
    good = run_dir(tmp, "good", complete_results())
    return [str(good), str(tmp / "gone")], str(tmp / "gone")


COMPLETE = json.dumps(complete_results(), indent=2)
BAD_INPUTS = {
    "no arguments": no_arguments,
    "missing directory": missing_directory,
    "empty directory": empty_directory,
    "file instead of a directory": file_instead_of_directory,
    "0-byte results.json": results_text(""),
    "truncated results.json": results_text(COMPLETE[: len(COMPLETE) // 2]),
    "foreign JSON": results_text(json.dumps({"method": "fpo", "win_rate": 0.7})),
    "seed of the wrong type": results_text(json.dumps(complete_results() | {"seed": "1"})),
    "list-shaped results.json": results_text(json.dumps([complete_results()])),
    "100000 nested lists": results_text("[" * 100_000 + "]" * 100_000),
    "results.json is a directory": results_is_a_directory,
    "a good run, then a missing one": good_run_then_missing,
}


@pytest.mark.parametrize("make", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_a_bad_input_is_one_error_line_naming_it_and_exit_code_2(
    make, tmp_path, monkeypatch, capsys
):
    args, named = make(tmp_path)
    assert_one_error_line(*runs_here(monkeypatch, capsys, *args), named)


def test_help_exits_0_and_describes_the_table(monkeypatch, capsys):
    code, out, err = runs_here(monkeypatch, capsys, "--help")
    assert code == 0 and err == "", err
    assert out.startswith("usage:") and "OUT_DIR" in out and "mean ± std" in out, out


def test_a_finished_run_gives_its_row_and_the_mean_of_two(tmp_path, monkeypatch, capsys):
    """Win rates 0.70 and 0.80: mean 0.750, standard deviation 0.1 / sqrt(2) = 0.071."""
    first = run_dir(tmp_path, "seed1", complete_results(seed=1, win_rate=0.70))
    second = run_dir(tmp_path, "seed2", complete_results(seed=2, win_rate=0.80))
    code, out, err = runs_here(monkeypatch, capsys, str(first), str(second))
    assert code == 0 and err == "", err
    assert out.splitlines() == [
        HEADER,
        "|---" * 12 + "|",
        "| seed1 | 1 | 2 | 0.700 | 0.990 | 0.995 | 0.745 | 0.555 | 0.554 | 0.458 | 1.40 | 3.5 |",
        "| seed2 | 2 | 2 | 0.800 | 0.990 | 0.995 | 0.745 | 0.555 | 0.554 | 0.458 | 1.40 | 3.5 |",
        "| mean ± std | | | 0.750 ± 0.071 | 0.990 ± 0.000 | 0.995 ± 0.000 | 0.745 ± 0.000 | "
        "0.555 ± 0.000 | 0.554 ± 0.000 | 0.458 ± 0.000 | 1.40 ± 0.00 | 3.5 ± 0.0 |",
    ]


def test_the_table_of_docs_seeds_md_comes_out_byte_for_byte():
    """docs/seeds.md was made by runs_table: its own rounded numbers, fed back, give its rows again
    (the mean ± std row is of the unrounded numbers, so only its columns are compared)."""
    text = (DOCS / "seeds.md").read_text()
    names, runs = [], []
    for line in text.splitlines()[2:-1]:
        name, seed, threads, *numbers = [cell.strip() for cell in line.strip("|").split("|")]
        win, valid, ref_valid, judge, ref_judge, on_topic, positive, kl, minutes = map(
            float, numbers
        )
        names.append(name)
        runs.append(
            {
                "seed": int(seed),
                "cpu_threads": int(threads),
                "win_rate": win,
                "policy": {"valid_rate": valid, "judge_score": judge, "kl_from_reference": kl},
                "reference": {
                    "valid_rate": ref_valid,
                    "judge_score": ref_judge,
                    "on_topic_rate": on_topic,
                    "positive_rate": positive,
                },
                "seconds": {"all stages": minutes * 60},
            }
        )
    remade = report.runs_table(names, runs).splitlines()
    assert remade[:-1] == text.splitlines()[:-1]
    assert remade[-1].count("±") == text.splitlines()[-1].count("±")


def test_a_run_without_judge_metrics_shows_dashes_not_nan(tmp_path, monkeypatch, capsys):
    own_data = run_dir(tmp_path, "own_data", unjudged_results())
    code, out, err = runs_here(monkeypatch, capsys, str(own_data))
    assert code == 0 and err == "", err
    assert "nan" not in out.lower(), out
    row, mean = out.splitlines()[2:]
    assert row == "| own_data | 2 | 2 | - | - | - | - | - | - | - | 1.10 | 0.5 |", row
    assert mean == "| mean ± std | | | - | - | - | - | - | - | - | 1.10 | 0.5 |", mean


def test_one_judged_run_and_one_not_average_what_there_is(tmp_path, monkeypatch, capsys):
    """The win rate's mean is the judged run's alone (no stdev of one value); the KL's is over
    both runs: 1.40 and 1.10, standard deviation 0.3 / sqrt(2) = 0.21."""
    judged = run_dir(tmp_path, "judged", complete_results(win_rate=0.72))
    own_data = run_dir(tmp_path, "own_data", unjudged_results())
    code, out, err = runs_here(monkeypatch, capsys, str(judged), str(own_data))
    assert code == 0 and err == "", err
    assert "nan" not in out.lower(), out
    cells = [cell.strip() for cell in out.splitlines()[-1].strip("|").split("|")]
    assert cells[3] == "0.720" and cells[-2] == "1.25 ± 0.21", cells


def test_a_pipe_in_a_directory_name_keeps_the_columns(tmp_path, monkeypatch, capsys):
    piped = run_dir(tmp_path, "lr|3e-5", complete_results())
    code, out, err = runs_here(monkeypatch, capsys, str(piped))
    assert code == 0 and err == "", err
    unescaped_pipes = [len(re.findall(r"(?<!\\)\|", line)) for line in out.splitlines()]
    assert unescaped_pipes == [13] * 4, out
    assert out.splitlines()[2].startswith("| lr\\|3e-5 | 1337 |"), out


@pytest.mark.slow
def test_the_script_prints_one_error_line_and_no_traceback(tmp_path):
    done = run_module("experiments.runs", str(tmp_path / "never_ran"))
    assert_one_error_line(done.returncode, done.stdout, done.stderr, str(tmp_path / "never_ran"))


@pytest.mark.slow
def test_a_fifo_as_results_json_is_refused_without_hanging(tmp_path):
    """Opening a FIFO waits for a writer that never comes: the file type is checked first."""
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "results.json")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.runs", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    named = str(tmp_path / "run" / "results.json")
    assert_one_error_line(done.returncode, done.stdout, done.stderr, named)


def test_chart_draws_each_run_s_training_log_and_keeps_stdout_the_table(
    tmp_path, monkeypatch, capsys
):
    out_dir = run_dir(tmp_path, "seed1", complete_results())
    records = [
        {"step": step, "loss": 0.7 - 0.1 * step, "margin": 0.2 * step, "accuracy": 0.5,
         "feature_mse": 0.001 * step, "ms_per_step": 30.0}
        for step in range(4)
    ]
    (out_dir / "policy_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    saved = record_figures(monkeypatch)
    code, out, err = runs_here(monkeypatch, capsys, "--chart", str(out_dir))
    assert code == 0 and out.startswith(HEADER), (out, err)
    assert err == f"runs: wrote {out_dir / 'policy_training.svg'}\n"
    assert ElementTree.parse(out_dir / "policy_training.svg").getroot().tag.endswith("svg")
    # one panel per logged quantity, each every step of the log
    panels = saved["policy_training.svg"].axes
    assert [axes.get_ylabel() for axes in panels] == list(report.TRAINING_LOG_KEYS)
    for axes, key in zip(panels, report.TRAINING_LOG_KEYS):
        (line,) = axes.get_lines()
        assert list(line.get_ydata()) == [record[key] for record in records]


@pytest.mark.parametrize("log", [None, "{not json", json.dumps({"step": 0}) + "\n"])
def test_chart_of_a_run_without_a_whole_log_is_one_error_line(log, tmp_path, monkeypatch, capsys):
    out_dir = run_dir(tmp_path, "run", complete_results())
    if log is not None:
        (out_dir / "policy_log.jsonl").write_text(log)
    code, out, err = runs_here(monkeypatch, capsys, "--chart", str(out_dir))
    assert_one_error_line(code, out, err, str(out_dir / "policy_log.jsonl"))
    assert not (out_dir / "policy_training.svg").exists()


@pytest.mark.slow
def test_a_finished_tiny_run_tabulates_and_charts_as_a_module(tiny_run, tmp_path, capsys):
    out_dir = tmp_path / "seed1337"
    out_dir.mkdir()
    for name in ("results.json", "policy_log.jsonl"):
        (out_dir / name).write_bytes((tiny_run[0] / name).read_bytes())
    done = run_module("experiments.runs", "--chart", str(out_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| run | seed | threads |")
    assert "| seed1337 | 1337 |" in done.stdout
    assert (out_dir / "policy_training.svg").exists()
    with pytest.raises(SystemExit) as exited:  # (in this process: the module runs, above)
        runs.main(["--help"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage:")
