"""The experiments under faults: a child process killed or interrupted, a parent killed, saved work
made from other inputs, truncated files, and flags refused at start-up.

The signal tests run `python -m experiments --compare` as a subprocess and signal it (or its
child) for real, on Linux (they find the child through /proc). In-process calls pass --threads 1
(as do the subprocesses: two processes of two threads each crawl on a two-core machine), and the
thread count is put back after every test.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import train
from experiments import common, sweep
from experiments.__main__ import main
from experiments.compare import COMPARE_ROWS
from experiments.tests.helpers import REPO, TINY, tiny_reference
from runtime import Interrupted, UsageError

ON_LINUX = Path("/proc/self/stat").exists()
# --compare as the signal tests run it: every step logged (and saved for --resume), and 60 steps,
# so a row trains long enough to be signalled mid-loop.
COMPARE = TINY + ["--threads", "1", "--log_every", "1", "--pref_steps", "60", "--seeds", "1"]
COMPARE_ROW_TAGS = [common.compare_tag(label, 1337) for label in COMPARE_ROWS]


STARTED = []  # every compare subprocess a test started, ended by `no_process_left_behind`


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing signal test may leave its compare running (a parent that hangs, a child that
    outlives it): end them, children first."""
    yield
    while STARTED:
        compare = STARTED.pop()
        for child in spawned_children(compare.pid):
            os.kill(child, signal.SIGKILL)
        if compare.poll() is None:
            compare.kill()
            compare.wait()


def start_compare(out_dir: Path, *flags: str, new_session: bool = False) -> subprocess.Popen:
    compare = subprocess.Popen(
        [sys.executable, "-m", "experiments", *COMPARE, "--out_dir", str(out_dir), "--compare",
         *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    STARTED.append(compare)
    return compare


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing workers process `pid` started (its resource tracker, also its child,
    is left out), found by the parent id in every /proc/<pid>/stat."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; only its parent (here perhaps init) reaps it


def child_training(process: subprocess.Popen, row: int, step: int) -> int:
    """Read the compare's output until the row-th training of this command (1: the first) logs
    `step`; then the id of the child process training it."""
    trainings = 0
    for line in process.stdout:
        trainings += line.startswith("== prefer:")
        if trainings == row and line.startswith(f"prefer step {step:>5}/"):
            (child,) = spawned_children(process.pid)
            return child
    raise AssertionError(f"the compare ended before training {row} logged step {step}")


def without_step_times(table: str) -> list[str]:
    """compare.md without its last column, ms/step: wall-clock time, which no rerun repeats."""
    lines = table.splitlines()
    header = lines[0].split(" | ")
    assert header[-1] == "ms/step |"
    return [line.rsplit(" | ", 1)[0] if line.count(" | ") == len(header) - 1 else line
            for line in lines]


@contextlib.contextmanager
def at_most(seconds: int):
    """Fail the block, rather than hang, if it runs longer (a parent waiting on a dead child)."""

    def too_long(signum, frame):
        raise AssertionError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fail_if_called(what: str):
    return lambda *args, **kwargs: pytest.fail(what)


@pytest.fixture(scope="module")
def uninterrupted_compare(tiny_run, tmp_path_factory):
    """The out_dir of an uninterrupted `python -m experiments --compare` with COMPARE's flags."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    tiny_reference(tiny_run, out_dir)
    finished = start_compare(out_dir)
    _, stderr = finished.communicate(timeout=600)
    assert finished.returncode == 0, stderr
    return out_dir


@pytest.fixture(scope="module")
def other_seed_gpt(tmp_path_factory):
    """A folder with a gpt.pt pretrained like the tiny run's, from another seed."""
    out_dir = tmp_path_factory.mktemp("other_seed")
    train.main(TINY + ["--out_dir", str(out_dir), "--seed", "7", "--stage", "pretrain"])
    return out_dir


# ---- the project's exceptions cross from a child process to its parent ----------------------


def test_interrupted_and_data_error_survive_pickling():
    stopped = Interrupted("prefer", 7, saved_to=Path("out/x.resume.pt"))
    again = pickle.loads(pickle.dumps(stopped))
    assert str(again) == str(stopped) == (
        "prefer interrupted at step 7; saved out/x.resume.pt; continue with --resume"
    )
    assert (again.stage, again.step, again.saved_to) == ("prefer", 7, Path("out/x.resume.pt"))
    for fault in (data.DataError("p.jsonl", 3, "'chosen' is missing"),
                  data.DataError(Path("c.txt"), None, "file is empty")):
        again = pickle.loads(pickle.dumps(fault))
        assert type(again) is data.DataError and str(again) == str(fault)
        assert (again.path, again.line, again.problem) == (fault.path, fault.line, fault.problem)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="at_most needs SIGALRM")
@pytest.mark.parametrize("function, args, message", [
    (data.load_corpus, ("missing.txt",),
     "compare_x_seed1: missing.txt: cannot read file (No such file or directory)"),
    (os._exit, (9,),
     "compare_x_seed1: the process training it stopped without a result (killed by a signal, "
     "perhaps by the out-of-memory killer); rerun with --resume"),
])
def test_a_child_that_fails_or_dies_is_one_line_naming_the_run(function, args, message):
    with at_most(60), pytest.raises(UsageError) as error:
        common.train_in_child("compare_x_seed1", "rerun with --resume", function, *args)
    assert str(error.value) == message


# ---- signals: a killed child, Ctrl-C, a killed parent ------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not ON_LINUX, reason="finds the child process through /proc")
def test_killed_or_interrupted_children_then_resume_give_the_uninterrupted_table(
    uninterrupted_compare, tiny_run, tmp_path
):
    """SIGKILL to the child training the first row: the parent stops at once with one line;
    `--resume`, and a Ctrl-C sent to the child training the second row alone: exit 130 and the
    hint; `--resume` again finishes with the uninterrupted run's table."""
    out_dir = tmp_path
    reference = tiny_reference(tiny_run, out_dir)
    first, second = COMPARE_ROW_TAGS[:2]

    compare = start_compare(out_dir)
    os.kill(child_training(compare, row=1, step=2), signal.SIGKILL)
    killed = time.time()
    _, stderr = compare.communicate(timeout=60)
    assert time.time() - killed < 10 and compare.returncode == 2, stderr
    assert stderr.splitlines() == [
        f"error: {first}: the process training it stopped without a result (killed by a "
        "signal, perhaps by the out-of-memory killer); rerun with --resume to continue it from "
        "its last saved step"
    ]
    assert (reference / f"{first}.resume.pt").exists()

    compare = start_compare(out_dir, "--resume")
    child = child_training(compare, row=2, step=2)
    os.kill(child, signal.SIGINT)
    _, stderr = compare.communicate(timeout=60)
    assert compare.returncode == 130, stderr
    assert stderr.splitlines()[-1].startswith("prefer interrupted at step ")
    assert stderr.splitlines()[-1].endswith(
        f"; saved {reference / f'{second}.resume.pt'}; continue with --resume"
    )
    assert "Traceback" not in stderr and not is_running(child)
    assert (reference / f"{first}_results.json").exists()  # finished, after its own resume

    resumed = start_compare(out_dir, "--resume")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert f"finished earlier ({reference / f'{first}_results.json'}); skipped (--resume)" in stdout
    resume_file = re.escape(str(reference / f"{second}.resume.pt"))
    assert re.search(rf"prefer: resuming from step \d+ \({resume_file}\)", stdout)
    assert not list(reference.glob("*.resume.pt"))
    expected = (uninterrupted_compare / "compare.md").read_text()
    assert without_step_times((out_dir / "compare.md").read_text()) == without_step_times(expected)


@pytest.mark.slow
@pytest.mark.skipif(not ON_LINUX, reason="finds the child process through /proc")
def test_a_terminal_ctrl_c_reaches_the_child_and_the_parent_waits_for_it(tiny_run, tmp_path):
    """A terminal's Ctrl-C goes to its whole process group: the parent and its child at once."""
    out_dir = tmp_path
    reference = tiny_reference(tiny_run, out_dir)
    compare = start_compare(out_dir, new_session=True)  # its own group, as under a terminal
    child = child_training(compare, row=1, step=2)
    os.killpg(compare.pid, signal.SIGINT)
    _, stderr = compare.communicate(timeout=60)
    assert compare.returncode == 130, stderr
    resume_file = reference / f"{COMPARE_ROW_TAGS[0]}.resume.pt"
    assert stderr.splitlines()[-1].endswith(f"; saved {resume_file}; continue with --resume")
    assert "Traceback" not in stderr and resume_file.exists() and not is_running(child)


@pytest.mark.slow
@pytest.mark.skipif(not ON_LINUX, reason="finds the child process through /proc")
def test_a_killed_parent_takes_its_child_with_it(tiny_run, tmp_path):
    out_dir = tmp_path
    reference = tiny_reference(tiny_run, out_dir)
    compare = start_compare(out_dir)
    child = child_training(compare, row=1, step=2)
    compare.kill()
    compare.wait(timeout=60)  # not communicate(): the child holds the output pipes until it ends
    deadline = time.time() + 10
    while is_running(child) and time.time() < deadline:
        time.sleep(0.1)
    compare.stdout.close()
    compare.stderr.close()
    if is_running(child):
        os.kill(child, signal.SIGKILL)  # leave no orphan behind, then fail
        pytest.fail("the child kept training after its parent was killed")
    # It stopped mid-training, not once done (an orphan fails to hand back its result then).
    assert not (reference / f"{COMPARE_ROW_TAGS[0]}.pt").exists()


# ---- saved work is reused only if made from the same inputs -----------------------------------


@pytest.mark.slow
def test_compare_rows_are_reused_only_from_the_same_gpt_and_sae(
    uninterrupted_compare, tmp_path, monkeypatch
):
    out_dir = tmp_path / "out"
    shutil.copytree(uninterrupted_compare, out_dir)
    argv = COMPARE + ["--out_dir", str(out_dir), "--compare", "--resume"]
    # The same inputs: every row is reused, nothing trains or is judged, the table is the same.
    monkeypatch.setattr(common, "in_child_process", fail_if_called("a row trained again"))
    monkeypatch.setattr(train, "evaluate_policy", fail_if_called("a row was judged again"))
    main(argv)
    expected = (uninterrupted_compare / "compare.md").read_text()
    assert (out_dir / "compare.md").read_text() == expected
    # A truncated row file is a cache to recompute, not an error.
    row_file = out_dir / "ref_seed1337" / f"{COMPARE_ROW_TAGS[0]}_results.json"
    row_text = row_file.read_text()
    row_file.write_text(row_text[: len(row_text) // 2])
    with pytest.raises(pytest.fail.Exception, match="a row trained again"):
        main(argv)
    row_file.write_text(row_text)
    # An SAE with the same settings and other weights (remade on another machine) under the
    # finished rows: they are trained again.
    other_weights(out_dir / "ref_seed1337" / "sae.pt")
    with pytest.raises(pytest.fail.Exception, match="a row trained again"):
        main(argv)


def other_weights(path: Path) -> None:
    """The checkpoint at `path` with one weight nudged: the same settings, another fingerprint."""
    checkpoint = torch.load(path, weights_only=True)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3
    torch.save(checkpoint, path)


@pytest.mark.slow
def test_sweep_runs_and_picks_are_used_only_from_the_same_inputs(
    tiny_run, other_seed_gpt, tmp_path, monkeypatch
):
    out_dir = tmp_path
    tiny_reference(tiny_run, out_dir)  # --compare's; --sweep pretrains its own, seed 1000
    # The smallest sweep, the same code: FPO at one setting, on one reference.
    monkeypatch.setattr(sweep, "SWEEP_LRS", (1e-3,))
    monkeypatch.setattr(sweep, "SWEEP_KNOBS", {"FPO": sweep.SWEEP_KNOBS["FPO"][:1]})
    monkeypatch.setattr(sweep, "SWEEP_EXTENSIONS", {})
    argv = TINY + ["--threads", "1", "--out_dir", str(out_dir), "--pref_steps", "3",
                   "--sweep_references", "1"]
    main(argv + ["--sweep"])
    main(argv + ["--compare", "--seeds", "1"])
    picks_file = out_dir / "sweep_picks.json"
    saved_picks = json.loads(picks_file.read_text())

    # A replaced pick: no row of the old pick may stand in the table that claims the new one.
    new_pick = saved_picks["picks"]["FPO"]["settings"] | {"beta": 4.0}
    picks_file.write_text(json.dumps(saved_picks | {"picks": {"FPO": {"settings": new_pick}}}))
    trained = []

    def train_here(function, *args):  # what a child would do, in this process
        trained.append(args[-1])
        return function(*args)

    monkeypatch.setattr(common, "in_child_process", train_here)
    main(argv + ["--compare", "--seeds", "1", "--resume"])
    assert trained == ["compare_fpo_seed1337", "compare_fpo_alpha_0_at_fpo_s_pick_seed1337"]
    rows = json.loads((out_dir / "compare.json").read_text())["rows"]
    assert [row["trained_with"]["beta"] for row in rows] == [4.0, 4.0]

    # A finished sweep trains nothing again; a truncated run file is recomputed, not an error.
    monkeypatch.setattr(train, "preference_models", fail_if_called("a sweep run trained again"))
    main(argv + ["--sweep"])
    reference = out_dir / "ref_seed1000"
    run_file = reference / f"{saved_picks['picks']['FPO']['run']}_results.json"
    run_text = run_file.read_text()
    run_file.write_text(run_text[:100])
    with pytest.raises(pytest.fail.Exception, match="a sweep run trained again"):
        main(argv + ["--sweep"])
    run_file.write_text(run_text)

    # An SAE with other weights: the sweep trains again. A GPT made with other settings is
    # refused, not reused or overwritten.
    shutil.copy(reference / "sae.pt", tmp_path / "sae.pt")
    other_weights(reference / "sae.pt")
    with pytest.raises(pytest.fail.Exception, match="a sweep run trained again"):
        main(argv + ["--sweep"])
    shutil.copy(other_seed_gpt / "gpt.pt", reference / "gpt.pt")
    with pytest.raises(UsageError) as refused:
        main(argv + ["--sweep"])
    assert str(refused.value) == (
        f"{reference / 'gpt.pt'} was made with --seed 7 (now 1000), not this run's settings: "
        f"delete {reference} to make it anew, or pass another --out_dir"
    )
    # Picks tuned with other judging (or training, data, ...) settings are refused by --compare.
    with pytest.raises(UsageError) as refused:
        main(argv + ["--compare", "--seeds", "1", "--max_new_tokens", "7"])
    assert str(refused.value) == (
        f"{picks_file} was made from another judging than this run's: rerun --sweep with these "
        "flags, or pass its own"
    )


# ---- start-up refusals: one line each, before any training ------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--sweep", "--n_eval_prompts", "100"],
     "--n_eval_prompts 100: must be at most 96 with --sweep (the validation split's distinct "
     "prompts, which it judges)"),
    (["--sweep", "--pref_steps", "10"],
     "--pref_steps 10: --sweep judges every 3 steps (a third of it), so no judged point falls on "
     "its runs' last step, 20; pick a multiple of 3, such as 9"),
    (["--compare", "--seed", "999"],
     "--seed 999: --compare's references (seeds 999-1003) overlap --sweep's (seeds 1000-1002), "
     "so picks would be judged on a reference they were tuned on; move --seed or --sweep_seed"),
    (["--sweep", "--picks", "picks.json"], "--picks: only --compare runs picks, not --sweep"),
    (["--compare", "--picks", "missing.json"],
     "--picks missing.json: no such file (docs/sweep_picks.json holds the picks the docs' tables "
     "were made with)"),
    (["--sweep", "--preference_file", "prefs.jsonl"],
     "--sweep judges sampled responses, and the judge knows only the toy world: drop "
     "--preference_file (--bench and `python train.py` take it)"),
    (["--compare", "--preference_file", "prefs.jsonl"],
     "--compare judges sampled responses, and the judge knows only the toy world: drop "
     "--preference_file (--bench and `python train.py` take it)"),
])
def test_experiment_flags_that_would_fail_later_are_refused_at_start(
    tmp_path, no_training, flags, message
):
    with pytest.raises(UsageError) as refused:
        main(TINY + ["--out_dir", str(tmp_path / "out"), *flags])
    assert str(refused.value) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [
    ["--sweep", "--n_eval_prompts", "96", "--pref_steps", "8"],  # judged every 2 steps: 8 is one
    ["--bench", "--preference_file", "PREFS"],
])
def test_experiment_flags_that_work_pass_the_start_up_checks(tmp_path, no_training, flags):
    prefs = tmp_path / "prefs.jsonl"
    pairs = data.make_preference_pairs(10, seed=0)
    prefs.write_text("".join(
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
        for p in pairs
    ))
    argv = TINY + ["--out_dir", str(tmp_path / "out")]
    with pytest.raises(pytest.fail.Exception, match="pretrain ran"):  # the first training
        main(argv + [str(prefs) if flag == "PREFS" else flag for flag in flags])


def test_an_out_dir_in_use_is_refused(tmp_path, no_training):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / ".lock").write_text(str(os.getpid()))  # this process: alive
    with pytest.raises(UsageError, match=r"--out_dir .* is in use by process \d+"):
        main(TINY + ["--out_dir", str(out_dir), "--compare"])
