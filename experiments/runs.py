"""Finished `python train.py` runs: the table of several (docs/seeds.md) and the picture of
one's preference training (docs/policy_training.svg).

    python -m experiments.runs OUT_DIR...          one Markdown row per run, then mean ± std
    python -m experiments.runs --chart OUT_DIR...  also OUT_DIR/policy_training.svg of each
"""

import sys
from pathlib import Path

from config import ArgumentParser, run_command
from experiments import figures, report
from runtime import UsageError, read_json


def read_run(out_dir: Path) -> dict:
    """out_dir/results.json of a finished `python train.py` run, or one `error:` line naming what
    is wrong: the directory, or a results.json that is missing, not a file (the type is checked
    before opening: reading a FIFO would wait forever), not JSON, or not a run's results."""
    finished_run = "give the --out_dir of a finished `python train.py` run"
    how_to_make = f"run `python train.py --out_dir {out_dir}` to the end (its eval stage writes it)"
    path = out_dir / "results.json"
    try:
        if not out_dir.is_dir():
            problem = "is not a directory" if out_dir.exists() else "not found"
            raise UsageError(f"{out_dir} {problem}: {finished_run}")
        if path.exists() and not path.is_file():
            raise UsageError(f"{path} is not a regular file: {finished_run}")
    except OSError as error:  # no permission to look, a name too long
        raise UsageError(f"{out_dir} cannot be read ({error.strerror}): {finished_run}") from None
    run = read_json(path, how_to_make)
    if not isinstance(run, dict):
        kind = type(run).__name__
        raise UsageError(f"{path} holds a JSON {kind}, not a run's results: {finished_run}")
    lacks = [key for key in ("seed", "cpu_threads") if not isinstance(run.get(key), int)]
    if lacks:
        raise UsageError(
            f"{path} is not a `python train.py` results.json (no integer {' or '.join(lacks)}): "
            f"{finished_run}"
        )
    return run


def main(argv: list[str]) -> None:
    """Print the Markdown table of the runs in argv's directories (report.runs_table); with
    --chart, also draw each run's training log."""
    parser = ArgumentParser(
        prog="-m experiments.runs",  # config.ArgumentParser says `python <prog> --help`
        description="Tabulate finished `python train.py` runs: one Markdown row per OUT_DIR, "
        "then the mean ± std of each column; `-` where a run has no value (a run on your own "
        "data has no judge metrics)."
    )
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="holds a results.json")
    parser.add_argument(
        "--chart",
        action="store_true",
        help="also write OUT_DIR/policy_training.svg: the loss, reward margin, reward accuracy "
        "and D(y) of OUT_DIR/policy_log.jsonl along the steps",
    )
    args = parser.parse_args(argv)
    out_dirs = [Path(out_dir) for out_dir in args.out_dirs]
    runs = [read_run(out_dir) for out_dir in out_dirs]
    charts = [training_chart(out_dir) for out_dir in out_dirs] if args.chart else []
    print(report.runs_table([out_dir.name for out_dir in out_dirs], runs), end="")
    for out_dir, chart in zip(out_dirs, charts):
        figures.save(chart, out_dir / "policy_training.svg")
        # stderr: stdout is the table, often redirected into a file
        print(f"runs: wrote {out_dir / 'policy_training.svg'}", file=sys.stderr)


def training_chart(out_dir: Path) -> figures.Figure:
    """The picture of out_dir/policy_log.jsonl (figures.training_log: loss, reward margin, reward
    accuracy and D(y) along the steps), or one `error:` line when the run has no complete log."""
    log_path = out_dir / "policy_log.jsonl"
    how_to_make = f"run `python train.py --out_dir {out_dir}` through its prefer stage"
    if not log_path.is_file():
        raise UsageError(f"{log_path} not found: {how_to_make}")
    try:
        records = report.read_log(log_path)
        return figures.training_log(
            records, report.TRAINING_LOG_KEYS, f"Preference training: {out_dir.name}"
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{log_path} is not a training log ({type(error).__name__}): {how_to_make}"
        ) from None


if __name__ == "__main__":
    run_command(main)
