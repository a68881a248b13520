"""The experiments' flags: each refuses an out-of-range value with one line naming it, before any
work; `--help` describes every one; and every command docs/ and experiments/README.md show parses.

The cases are built from ExperimentConfig itself: a flag added without a bad-value case here
fails `test_every_experiment_flag_refuses_an_out_of_range_value`.
"""

import dataclasses
import re
import shlex

import pytest

import config
from config import build_parser, parse_args
from experiments.__main__ import main
from experiments.settings import (
    EXPERIMENTS, ExperimentConfig, LabConfig, check_experiment_flags,
)
from experiments.tests.helpers import DOCS, PACKAGE, REPO, run_module
from runtime import UsageError

EXPERIMENT_FLAGS = [f.name for f in dataclasses.fields(ExperimentConfig)]
# flag: [(argv, the error's text)], checked at parsing, before any work
CASES = {
    "compare": [(["--compare=1"], "--compare: ignored explicit argument '1'")],
    "seeds": [
        (["--compare", "--seeds", "0"], "--seeds 0: must be > 0"),
        (["--compare", "--seeds", "101"], "--seeds 101: must be at most 100"),
        # a count whose list of seeds would not fit in memory: a clean line, no MemoryError
        (["--compare", "--seeds", "1000000000000"], "--seeds 1000000000000: must be at most 100"),
        (["--compare", "--seed", "4294967290", "--seeds", "7"],
         "--seeds 7: must be at most 6 with --seed 4294967290"),
    ],
    "picks": [(["--picks"], "--picks: expected one argument")],
    "sweep": [(["--sweep=1"], "--sweep: ignored explicit argument '1'")],
    "sweep_seed": [
        (["--sweep_seed", "-1"], "--sweep_seed -1: must be >= 0"),
        (["--sweep_seed", "4294967296"], "--sweep_seed 4294967296: must be below 2**32"),
    ],
    "sweep_references": [
        (["--sweep", "--sweep_references", "0"], "--sweep_references 0: must be > 0"),
        (["--sweep", "--sweep_references", "10000000000"],
         "--sweep_references 10000000000: must be at most 100"),
        (["--sweep", "--sweep_seed", "4294967295", "--sweep_references", "2"],
         "--sweep_references 2: must be at most 1 with --sweep_seed 4294967295"),
    ],
    "head_to_head": [(["--head_to_head=1"], "--head_to_head: ignored explicit argument '1'")],
    "ablation": [(["--ablation=1"], "--ablation: ignored explicit argument '1'")],
    "control": [(["--control=1"], "--control: ignored explicit argument '1'")],
    "bound": [(["--bound=1"], "--bound: ignored explicit argument '1'")],
    "bench": [(["--bench=1"], "--bench: ignored explicit argument '1'")],
    "bench_steps": [
        (["--bench", "--bench_steps", "0"], "--bench_steps 0: must be > 0"),
        (["--bench", "--bench_steps", "1000000"], "--bench_steps 1000000: must be at most 10000"),
    ],
    "workers": [
        (["--compare", "--workers", "0"], "--workers 0: must be > 0"),
        (["--compare", "--workers", "65"], "--workers 65: must be at most 64"),
    ],
}
FLAG_CASES = [(flag, argv, text) for flag in EXPERIMENT_FLAGS for argv, text in CASES.get(flag, [])]


def parse_lab_args(argv: list[str]) -> LabConfig:
    cfg = parse_args(argv, prog="-m experiments", config_type=LabConfig)
    check_experiment_flags(cfg)
    return cfg


def test_every_experiment_flag_has_a_case_and_only_the_lab_has_them():
    assert set(CASES) == set(EXPERIMENT_FLAGS)
    pipeline_flags = set(vars(build_parser("").parse_args([])))
    assert not pipeline_flags & set(EXPERIMENT_FLAGS), "an experiment flag in train.py's Config"
    lab_flags = set(vars(build_parser("", config_type=LabConfig).parse_args([])))
    assert lab_flags == pipeline_flags | set(EXPERIMENT_FLAGS)


@pytest.mark.parametrize("flag, argv, text", FLAG_CASES,
                         ids=[" ".join(argv) for _, argv, _ in FLAG_CASES])
def test_every_experiment_flag_refuses_an_out_of_range_value(flag, argv, text):
    with pytest.raises(UsageError) as refused:
        parse_lab_args(argv)
    assert str(refused.value).startswith(text), str(refused.value)


def test_the_defaults_and_the_pipeline_flags_parse_as_train_py_s():
    cfg = parse_lab_args(["--compare", "--beta", "0.5", "--seeds", "2"])
    assert cfg.experiment == ExperimentConfig(compare=True, seeds=2)
    assert cfg.prefer.beta == 0.5 and cfg.run == config.RunConfig()
    with pytest.raises(UsageError, match=r"--n_layer 0: must be > 0"):
        parse_lab_args(["--compare", "--n_layer", "0"])


def test_help_describes_every_flag_of_every_section(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_lab_args(["--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for section in dataclasses.fields(LabConfig):
        helps = config.field_help(section.type)
        assert set(helps) == {f.name for f in dataclasses.fields(section.type)}, section.name
        for name, text in helps.items():
            assert f"--{name}" in shown and " ".join(text.split()) in shown, name


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `python -m experiments...` command of docs/ and experiments/README.md, in bash blocks
    or inline code, as (module, argv), with shell variables (as 1) and comments removed."""
    commands = []
    for page in [PACKAGE / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(python -m experiments[^`]*)`", text)
        for line in lines:
            for module, args in re.findall(r"python -m (experiments[\w.]*)([^;#>|]*)", line):
                commands.append((module, shlex.split(re.sub(r"\$\S+", "1", args))))
    return commands


def test_every_documented_command_parses_and_no_old_script_is_named():
    commands = documented_commands()
    assert {module for module, _ in commands} <= {"experiments", "experiments.runs",
                                                   "experiments.features", "experiments.profile"}
    shown = {flag for module, argv in commands if module == "experiments" for flag in argv}
    assert {f"--{name}" for name in EXPERIMENTS} <= shown  # every experiment is shown
    parser = build_parser("", config_type=LabConfig)
    for module, argv in commands:
        if module == "experiments" and "--help" not in argv:
            parser.parse_args(argv)  # names and types: shell variables stand in as 1
    pages = [PACKAGE / "README.md", *DOCS.glob("*.md"), *REPO.glob("integrations/**/*.md")]
    for page in pages:
        text = page.read_text()
        assert not re.search(r"python (experiments|evaluate)\.py", text), page


@pytest.mark.slow
def test_the_module_answers_help_and_a_bad_flag_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exited:  # (in this process: the module runs, below)
        main(["--help"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage:")
    done = run_module("experiments", "--compare", "--seeds", "0")
    assert done.returncode == 2 and done.stderr == "error: --seeds 0: must be > 0\n", done.stderr
    # (no experiment, or two, is refused the same way, in this process)
    for two_or_none in (["--sweep", "--compare"], []):
        with pytest.raises(UsageError, match="^pick one experiment: --sweep, --compare"):
            main(two_or_none)
