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
import experiments.__main__ as experiments_main
from config import parse_args, stage_settings
from experiments import common, paper, sweep
from experiments.__main__ import main
from experiments.compare import COMPARE_ROWS, picked_rows
from experiments.settings import LabConfig
from experiments.tests.helpers import QUICK_JUDGE, REPO, fail_if_called, tiny_reference
from runtime import Interrupted, UsageError, save_checkpoint
from tests.helpers import TINY

ON_LINUX = Path("/proc/self/stat").exists()
# --compare as the signal tests run it: every step logged (and saved for --resume), and the rows
# of one pick (FPO's, and FPO with alpha 0 at it) of 20 steps: long enough to be signalled
# mid-loop, short enough that the whole comparison takes seconds.
COMPARE = TINY + QUICK_JUDGE + ["--threads", "1", "--log_every", "1", "--seeds", "1"]
SIGNAL_PICKS = {"FPO": {"method": "fpo", "beta": 1.0, "alpha": 256.0, "pref_lr": 1e-3,
                        "pref_steps": 20}}
COMPARE_ROW_TAGS = [common.compare_tag(label, 1337) for label in picked_rows(SIGNAL_PICKS)]


STARTED = []  # every compare subprocess a test started, ended by `no_process_left_behind`


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing signal test may leave its compare running (a parent that hangs, a child that
    outlives it): end them, children first."""
    yield
    while STARTED:
        compare = STARTED.pop()
        for child in spawned_children(compare.pid) + fork_servers(compare.pid, processes()):
            os.kill(child, signal.SIGKILL)
        if compare.poll() is None:
            compare.kill()
            compare.wait()


def start_compare(out_dir: Path, *flags: str, new_session: bool = False) -> subprocess.Popen:
    """`python -m experiments --compare` with COMPARE's flags, at SIGNAL_PICKS (out_dir's
    sweep_picks.json)."""
    write_signal_picks(out_dir)
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


def write_signal_picks(out_dir: Path) -> None:
    """out_dir/sweep_picks.json holding SIGNAL_PICKS, unless it is there already."""
    picks = out_dir / "sweep_picks.json"
    if not picks.exists():
        cfg = parse_args(COMPARE + ["--compare"], config_type=LabConfig)
        picks.write_text(json.dumps({
            "made_from": sweep.recipe(cfg),
            "picks": {label: {"settings": settings} for label, settings in SIGNAL_PICKS.items()},
        }))


def processes() -> dict[int, tuple[int, bytes]]:
    """{pid: (parent id, command line)} of every process, from /proc/<pid>/stat and cmdline."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid
            found[int(stat.parent.name)] = (int(fields[1]), (stat.parent / "cmdline").read_bytes())
        except OSError:  # the process ended meanwhile
            continue
    return found


def fork_servers(pid: int, running: dict) -> list[int]:
    """The multiprocessing fork servers process `pid` started (common.child_processes)."""
    return [child for child, (parent, cmdline) in running.items()
            if parent == pid and b"forkserver" in cmdline]


def spawned_children(pid: int) -> list[int]:
    """The processes that run process `pid`'s tasks: the children of its fork server, or
    (without one) the workers it spawned; its resource tracker is left out."""
    running = processes()
    servers = fork_servers(pid, running)
    return [child for child, (parent, cmdline) in running.items()
            if parent in servers or (parent == pid and b"spawn_main" in cmdline)]


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


@pytest.fixture(scope="module")
def uninterrupted_compare(tiny_run, tmp_path_factory):
    """The out_dir of an uninterrupted --compare with COMPARE's flags, run in this process (its
    rows train in child processes, as under `python -m experiments`)."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    tiny_reference(tiny_run, out_dir)
    write_signal_picks(out_dir)
    threads = torch.get_num_threads()
    main(COMPARE + ["--out_dir", str(out_dir), "--compare"])
    torch.set_num_threads(threads)
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
    `--resume`, and a terminal's Ctrl-C while the child trains the second row (it goes to the
    whole process group: the parent, its fork server and the child at once): exit 130 and the
    hint, the parent having waited for its child to save; `--resume` again finishes with the
    uninterrupted run's table."""
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

    compare = start_compare(out_dir, "--resume", new_session=True)  # its own group, as a terminal's
    child = child_training(compare, row=2, step=2)
    os.killpg(compare.pid, signal.SIGINT)
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
    _, fpo_knobs = sweep.SWEEP_GRIDS["FPO"]
    monkeypatch.setattr(sweep, "SWEEP_GRIDS", {"FPO": ((1e-3,), fpo_knobs[:1])})
    argv = TINY + QUICK_JUDGE + ["--threads", "1", "--out_dir", str(out_dir), "--pref_steps",
                                 "3", "--sweep_references", "1"]
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


# ---- a --picks file is checked before any training --------------------------------------------


def picks_file(tmp_path: Path, argv: list[str], picks) -> Path:
    """A picks file for the command line `argv`: --sweep's shape, made for its recipe, with
    `picks` as its picks."""
    cfg = parse_args(argv + ["--compare"], config_type=LabConfig)
    path = tmp_path / "picks.json"
    path.write_text(json.dumps({"made_from": sweep.recipe(cfg), "picks": picks}))
    return path


FPO_PICK = {"method": "fpo", "beta": 1.0, "alpha": 256.0, "pref_lr": 6e-5, "pref_steps": 30}


@pytest.mark.parametrize("picks, message", [
    ([FPO_PICK], "no 'picks' object (each method's pick by label): rerun --sweep, or pass "
                 "docs/sweep_picks.json"),
    ({"DPO": {"settings": FPO_PICK | {"method": "dpo"}}},
     "no pick for FPO, which every other row is compared with"),
    ({"FPO": FPO_PICK}, "the pick 'FPO' has no 'settings' object"),
    ({"FPO": {"settings": FPO_PICK | {"betta": 1.0}}},
     "FPO's setting 'betta' is no preference setting (`python train.py --help` lists them under "
     "PreferenceConfig)"),
    ({"FPO": {"settings": FPO_PICK | {"method": "ppo"}}},
     "FPO's method 'ppo': must be one of fpo, fpo_kl, dpo, dpo_offline, simpo, tdpo1, tdpo2"),
    ({"FPO": {"settings": {"beta": 1.0}}}, "FPO's settings have no method"),
    ({"FPO": {"settings": FPO_PICK | {"pref_steps": 0}}}, "FPO's --pref_steps 0: must be > 0"),
    ({"FPO": {"settings": FPO_PICK | {"pref_steps": 2.5}}},
     "FPO's pref_steps 2.5: must be int, as --pref_steps is"),
    ({"FPO": {"settings": FPO_PICK | {"fpo_stop_grad": 1}}},
     "FPO's fpo_stop_grad 1: must be bool, as --fpo_stop_grad is"),
    ({"FPO": {"settings": FPO_PICK | {"beta": float("nan")}}},
     "FPO's --beta nan: must be a finite number"),
    ({"FPO": {"settings": FPO_PICK | {"beta": -2}}}, "FPO's --beta -2.0: must be > 0"),
    ({"FPO": {"settings": FPO_PICK}, "fpo": {"settings": FPO_PICK}},
     "the rows 'FPO' and 'fpo' would share their files (compare_fpo_seed0): rename one"),
    ({"FPO": {"settings": FPO_PICK, "validation": [0.5]}},
     "FPO's 'validation' is not by reference seed"),
])
def test_every_entry_of_a_picks_file_is_checked_at_start(tmp_path, no_training, picks, message):
    argv = TINY + ["--out_dir", str(tmp_path / "out")]
    path = picks_file(tmp_path, argv, picks)
    with pytest.raises(UsageError) as refused:
        main(argv + ["--compare", "--picks", str(path)])
    assert str(refused.value) == f"--picks {path}: {message}"
    assert not (tmp_path / "out").exists()


def test_picks_in_the_out_dir_are_checked_as_well(tmp_path, no_training):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "sweep_picks.json").write_text(json.dumps({"made_from": {}, "picks": []}))
    with pytest.raises(UsageError) as refused:
        main(TINY + ["--out_dir", str(out_dir), "--compare"])
    assert str(refused.value) == (
        f"{out_dir / 'sweep_picks.json'}: no 'picks' object (each method's pick by label): rerun "
        "--sweep, or pass docs/sweep_picks.json"
    )


def test_a_picks_directory_or_fifo_has_its_own_message(tmp_path, no_training):
    argv = TINY + ["--out_dir", str(tmp_path / "out"), "--compare", "--picks"]
    (tmp_path / "picks_dir").mkdir()
    fifo = tmp_path / "picks_fifo"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    for path, kind in ((tmp_path / "picks_dir", "a directory"),
                       (fifo, "not a regular file (a FIFO or a device?)")):
        with pytest.raises(UsageError) as refused:
            main(argv + [str(path)])
        assert str(refused.value) == (
            f"--picks {path}: {kind}, not a picks file (rerun --sweep, or pass "
            "docs/sweep_picks.json)"
        )


def test_picks_are_not_judged_on_the_references_they_were_tuned_on(tmp_path, no_training):
    """The docs' picks record the references they were tuned on (1000-1002): --compare refuses
    to judge them there, whatever --sweep_seed says."""
    argv = ["--out_dir", str(tmp_path / "out"), "--compare", "--picks", "docs/sweep_picks.json"]
    with pytest.raises(UsageError) as refused:
        main(argv + ["--seed", "1000", "--sweep_seed", "2000"])
    assert str(refused.value) == (
        "--picks docs/sweep_picks.json was tuned on references 1000, 1001, 1002, and --compare's "
        "(seeds 1000-1004) include 1000, 1001, 1002: picks must be judged on other references; "
        "move --seed (--seed 1003 clears them)"
    )
    # and a file that records none is judged against --sweep_seed's references, as before
    path = picks_file(tmp_path, TINY, {"FPO": {"settings": FPO_PICK}})
    with pytest.raises(UsageError, match="--seed 999: --compare's references"):
        main(TINY + argv[:3] + ["--picks", str(path), "--seed", "999"])


def test_a_good_picks_file_passes_the_start_up_checks(tmp_path, no_training, capsys):
    argv = TINY + ["--out_dir", str(tmp_path / "out"), "--threads", "1"]
    path = picks_file(tmp_path, argv, {"FPO": {"settings": FPO_PICK | {"beta": 1},
                                               "validation": {"1000": {}}}})
    with pytest.raises(pytest.fail.Exception, match="pretrain ran"):  # the first training
        main(argv + ["--compare", "--picks", str(path), "--seeds", "1"])
    # tuned with a thread count it does not record: a note, not a refusal (the docs run their
    # 2-thread picks at 1 thread too)
    assert (f"compare: note: {path} was tuned with a thread count it does not record; this run "
            "has 1, which rounds differently") in capsys.readouterr().out


# ---- --head_to_head and --bound read compare.json's policies, and nothing else ----------------


def fake_compare(out_dir: Path, argv: list[str], seed: int = 1337) -> dict:
    """compare.json of two rows on one reference, and the files it names: the reference's GPT,
    SAE and cache (empty: the start-up checks only ask that they are there) and each row's policy
    checkpoint, trained with its row's settings from its GPT and SAE (no weights)."""
    cfg = parse_args(argv, config_type=LabConfig)
    seed_cfg = common.with_method(cfg, {})
    seed_cfg.run.seed = seed
    ref_dir = out_dir / f"ref_seed{seed}"
    ref_dir.mkdir(parents=True)
    for name in ("gpt.pt", "sae.pt", "reference_cache.pt"):
        (ref_dir / name).write_bytes(b"")
    rows, settings = [], {"FPO": COMPARE_ROWS["FPO"], "DPO": COMPARE_ROWS["DPO"]}
    for label, overrides in settings.items():
        row_settings = stage_settings(common.with_method(seed_cfg, overrides), "prefer", seed)
        made_from = {"GPT": "gpt-fingerprint", "SAE": "sae-fingerprint",
                     "data": common.data_settings(seed_cfg), "eval": {}, "settings": row_settings}
        rows.append({"label": label, "seed": seed, "made_from": made_from, "cpu_threads": 1})
        save_checkpoint(ref_dir / f"{common.compare_tag(label, seed)}.pt", "policy",
                        row_settings, {"reference model": "gpt-fingerprint",
                                       "SAE": "sae-fingerprint"})
    compare_json = {"rows": rows, "settings": settings}
    (out_dir / "compare.json").write_text(json.dumps(compare_json))
    return compare_json


@pytest.mark.parametrize("experiment", ["--head_to_head", "--bound"])
def test_compare_s_policies_as_compare_json_describes_them_pass_the_start_up_checks(
    tmp_path, no_training, monkeypatch, experiment
):
    argv = TINY + ["--threads", "1", "--out_dir", str(tmp_path)]
    fake_compare(tmp_path, argv)
    ran = []
    for name in ("head_to_head", "bound"):
        monkeypatch.setattr(experiments_main, name, lambda cfg, device: ran.append(cfg))
    main(argv + [experiment])
    assert len(ran) == 1


def fpo_policy_trained_at_another_rate(out_dir: Path) -> None:
    path = out_dir / "ref_seed1337" / "compare_fpo_seed1337.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["pref_lr"] = 0.03
    torch.save(checkpoint, path)


@pytest.mark.parametrize("change, flags, message", [
    ("compare.json []", [],
     "{out}/compare.json is not what --compare writes (a JSON list, not an object): rerun "
     "`python -m experiments --compare --resume`"),
    ("compare.json {}", [],
     "{out}/compare.json is not what --compare writes (no 'settings' with FPO's): rerun "
     "`python -m experiments --compare --resume`"),
    ("rows without seeds", [],
     "{out}/compare.json is not what --compare writes (a row without its label, seed or what it "
     "was made from): rerun `python -m experiments --compare --resume`"),
    ("reference deleted", [],
     "{out}/ref_seed1337/gpt.pt not found (compare.json's FPO on reference 1337): rerun "
     "`python -m experiments --compare --resume`"),
    ("policy deleted", [],
     "{out}/ref_seed1337/compare_dpo_seed1337.pt not found (compare.json's DPO on reference "
     "1337): rerun `python -m experiments --compare --resume`"),
    ("policy retrained", [],
     "{out}/ref_seed1337/compare_fpo_seed1337.pt is not compare.json's FPO (trained with "
     "--pref_lr 0.03 (the row's: 0.001)): rerun `python -m experiments --compare --resume`"),
    ("", ["--threads", "2"],
     "compare.json's rows were trained with 1 CPU threads, this run has 2: rerun with "
     "--threads 1"),
    ("", ["--n_pairs", "100"],
     "compare.json's rows were made from other data than this run's (--n_pairs, "
     "--n_test_pairs): pass the flags --compare ran with"),
    ("reference a file", [],
     "{out}/ref_seed1337 is a file, not a reference's directory (one seed's GPT, SAE and runs): "
     "move it away or delete it"),
    ("reference made with 2 threads", [],
     "{out}/ref_seed1337 was made with 2 CPU threads, this run has 1 (they round differently): "
     "rerun with --threads 2, or pass another --out_dir"),
    (".lock a directory", [],
     "{out}/.lock is not a lock file: remove it (rm -r {out}/.lock), then rerun"),
])
def test_what_head_to_head_and_bound_read_is_checked_before_any_work(
    tmp_path, no_training, monkeypatch, change, flags, message
):
    """--head_to_head and --bound share these checks (check_compare_policies): each case runs one
    of them, in turn."""
    experiment = "--bound" if change.startswith(("compare.json {}", "policy")) else "--head_to_head"
    argv = TINY + ["--threads", "1", "--out_dir", str(tmp_path)]
    compare_json = fake_compare(tmp_path, argv)
    reference = tmp_path / "ref_seed1337"
    if change.startswith("compare.json"):
        (tmp_path / "compare.json").write_text(change.split()[1])
    elif change == "rows without seeds":
        for row in compare_json["rows"]:
            del row["seed"]
        (tmp_path / "compare.json").write_text(json.dumps(compare_json))
    elif change == "reference deleted":
        shutil.rmtree(reference)
    elif change == "policy deleted":
        (reference / "compare_dpo_seed1337.pt").unlink()
    elif change == "policy retrained":
        fpo_policy_trained_at_another_rate(tmp_path)
    elif change == "reference a file":
        shutil.rmtree(reference)
        reference.write_text("")
    elif change == "reference made with 2 threads":
        (reference / "threads.json").write_text(json.dumps({"threads": 2}))
    elif change == ".lock a directory":
        (tmp_path / ".lock").mkdir()
    for name in ("head_to_head", "bound"):
        monkeypatch.setattr(experiments_main, name, fail_if_called(f"{name} ran"))
    with pytest.raises(UsageError) as refused:
        main(argv + flags + [experiment])
    assert str(refused.value) == message.format(out=tmp_path)


def test_an_experiment_locks_its_reference_directories(tmp_path, no_training, monkeypatch):
    """`python train.py --out_dir out/ref_seed1337` would rebuild a cache under a running
    experiment: refused while the experiment holds out/'s lock."""
    argv = TINY + ["--threads", "1", "--out_dir", str(tmp_path)]
    fake_compare(tmp_path, argv)
    refused = []

    def a_second_command(cfg, device):
        with pytest.raises(UsageError) as error:
            train.main(TINY + ["--out_dir", str(tmp_path / "ref_seed1337"), "--stage", "cache"])
        refused.append(str(error.value))

    monkeypatch.setattr(experiments_main, "head_to_head", a_second_command)
    main(argv + ["--head_to_head"])
    assert refused == [
        f"--out_dir '{tmp_path / 'ref_seed1337'}' is in use by process {os.getpid()} (its "
        f"{tmp_path / 'ref_seed1337' / '.lock'}): wait for it to finish, or pick another --out_dir"
    ]
    assert not (tmp_path / "ref_seed1337" / ".lock").exists()  # released with out/'s


# ---- off-grid settings and impossible sizes -----------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--control", "--d_sae", "6", "--sae_k", "2"],
     r"--d_sae 6: --control \w+ sets of 8 latents, so the SAE needs at least 8: pass --d_sae 8 "
     "or more"),
    (["--ablation", "--alpha", "1e308"],
     r"--alpha 1e\+308: --ablation's row 'alpha inf, stop-gradient on' would train at alpha inf; "
     "pass a smaller --alpha, or drop it"),
])
def test_impossible_experiment_settings_are_refused_at_start(tmp_path, no_training, flags,
                                                             message):
    with pytest.raises(UsageError) as refused:
        main(TINY + ["--out_dir", str(tmp_path / "out"), *flags])
    assert re.fullmatch(message, str(refused.value)), str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--alpha", "5"], ["--fpo_k", "5"], ["--alpha", "0"],
                                   ["--alpha", "0.3", "--fpo_k", "300"]])
def test_the_ablation_has_a_row_at_any_setting_to_compare_with(flags):
    cfg = parse_args(TINY + flags, config_type=LabConfig)
    for rows in paper.ablation_rows(cfg).values():
        assert any(paper.is_default(cfg, changed) for changed in rows.values())


# ---- Ctrl-C at any moment of a child's life ------------------------------------------------------


def child_started(process: subprocess.Popen) -> int:
    """The id of the compare's fork server (or, without one, its first child), as soon as it
    exists: it is then importing torch, and no child has reached a training loop."""
    deadline = time.time() + 60
    while time.time() < deadline:
        children = fork_servers(process.pid, processes()) or spawned_children(process.pid)
        if children:
            return children[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("no child process started")


@pytest.mark.slow
@pytest.mark.skipif(not ON_LINUX, reason="finds the child process through /proc")
@pytest.mark.parametrize("to_group, delay", [(True, 0.0), (False, 1.0)],
                         ids=["terminal at once", "parent only after 1 s"])
def test_ctrl_c_while_a_child_starts_is_one_line_with_the_resume_hint(
    tiny_run, tmp_path, delay, to_group
):
    """A Ctrl-C while the child starts (the fork server, or a spawned child, imports torch;
    nothing can be saved yet): the parent's one line, exit code 130, no traceback from any
    process, none left running."""
    tiny_reference(tiny_run, tmp_path)
    compare = start_compare(tmp_path, new_session=True)
    child = child_started(compare)
    time.sleep(delay)
    if to_group:
        os.killpg(compare.pid, signal.SIGINT)
    else:
        os.kill(compare.pid, signal.SIGINT)
    _, stderr = compare.communicate(timeout=60)
    assert compare.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.splitlines()[-1] == (
        f"{COMPARE_ROW_TAGS[0]} interrupted (Ctrl-C) outside its training loop; rerun with "
        "--resume to continue it from its last saved step"
    )
    time.sleep(0.5)
    assert not is_running(child)


def test_a_reference_deleted_while_an_experiment_runs_says_to_rerun_it(tmp_path):
    """The run's own message would say `python train.py --stage pretrain`; the experiment makes
    its references, so rerunning it is the fix."""
    ref_cfg = parse_args(["--out_dir", str(tmp_path)])
    (tmp_path / "sae.pt").write_bytes(b"")
    with pytest.raises(UsageError) as refused, common.reference_kept(ref_cfg):
        raise UsageError(f"{tmp_path / 'gpt.pt'} not found: run `python train.py --stage "
                         "pretrain` first")
    assert str(refused.value) == (
        f"{tmp_path / 'gpt.pt'} is gone (deleted while the experiment ran?): rerun the same "
        "command with --resume, which makes the reference again"
    )
    (tmp_path / "gpt.pt").write_bytes(b"")  # both there: the run's own message stands
    with pytest.raises(UsageError, match="not a readable checkpoint"), common.reference_kept(
        ref_cfg
    ):
        raise UsageError("gpt.pt is not a readable checkpoint")


@pytest.mark.slow
def test_compare_resume_retrains_a_row_whose_policy_another_compare_replaced(
    uninterrupted_compare, tmp_path, monkeypatch
):
    """A second --compare, stopped between training a row and writing its results, leaves the
    first's row file beside its own policy: --resume trains that row again rather than leave a
    policy --head_to_head would judge under the row's name."""
    out_dir = tmp_path / "out"
    shutil.copytree(uninterrupted_compare, out_dir)
    fpo_policy_trained_at_another_rate(out_dir)
    trained = []
    monkeypatch.setattr(common, "in_child_process",
                        lambda function, *args: trained.append(args[-1]) or function(*args))
    main(COMPARE + ["--out_dir", str(out_dir), "--compare", "--resume"])
    assert trained == [COMPARE_ROW_TAGS[0]]
    assert without_step_times((out_dir / "compare.md").read_text()) == without_step_times(
        (uninterrupted_compare / "compare.md").read_text()
    )


# ---- the CPU thread count is part of what a reference and a run were made from -----------------


def test_a_reference_records_its_thread_count_and_refuses_another(tmp_path, monkeypatch):
    """The stages that make a reference, faked: each writes its file. The reference then records
    this process's thread count; at another count it is refused, not reused."""
    def writes(name: str):
        def stage(cfg, device):
            (Path(cfg.run.out_dir) / name).write_bytes(b"")
        return stage

    (tmp_path / "ref_seed7").mkdir()
    monkeypatch.setattr(train, "pretrain", writes("gpt.pt"))
    monkeypatch.setattr(train, "train_sae_stage", writes("sae.pt"))
    cfg = parse_args(["--out_dir", str(tmp_path)], config_type=LabConfig)
    torch.set_num_threads(1)
    common.reference_run(cfg, 7, "cpu")
    assert json.loads((tmp_path / "ref_seed7" / "threads.json").read_text()) == {"threads": 1}
    torch.set_num_threads(2)
    with pytest.raises(UsageError) as refused:
        common.reference_run(cfg, 7, "cpu")
    assert str(refused.value) == (
        f"{tmp_path / 'ref_seed7'} was made with 1 CPU threads, this run has 2 (they round "
        "differently): rerun with --threads 1, or pass another --out_dir"
    )


def test_a_saved_run_is_reused_only_at_the_thread_count_it_was_made_with(tmp_path, capsys):
    path = tmp_path / "run_results.json"
    made_from = {"GPT": "g"}
    path.write_text(json.dumps({"made_from": made_from, "cpu_threads": 2}))
    torch.set_num_threads(2)
    assert common.saved_run(path, made_from) is not None
    torch.set_num_threads(1)
    assert common.saved_run(path, made_from) is None
    assert capsys.readouterr().out == (
        f"{path} was made with 2 CPU threads, this run has 1 (they round differently); running "
        "it again\n"
    )
    path.write_text(json.dumps({"made_from": made_from}))  # an older version's: no count
    assert common.saved_run(path, made_from) is not None
