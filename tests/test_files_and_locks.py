"""Files the pipeline reads and writes, and the runs that share them: no file runs code, every
write is whole or absent, one run per --out_dir, non-finite weights are never saved, and odd
terminals (a closed pipe, an ASCII-only encoding) do not break a run."""

import os
import subprocess
import sys
import time

import pytest
import torch

import data
import runtime
import train
from conftest import REPO, copy_outputs, run_main_as_script
from helpers import TINY


class RunsCode:
    """Unpickling this calls open(marker, "w"): a file appears if the load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# Each load site: the file, and a command that reads it (on a copy of the tiny run).
LOAD_SITES = [
    ("gpt.pt", ["--stage", "sae"]),
    ("sae.pt", ["--stage", "cache"]),
    ("reference_cache.pt", ["--stage", "prefer"]),
    ("policy.pt", ["--stage", "eval"]),
    ("policy.resume.pt", ["--stage", "prefer", "--resume"]),
    ("gpt.resume.pt", ["--stage", "pretrain", "--resume"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, stage", LOAD_SITES)
def test_a_checkpoint_carrying_code_runs_none_and_is_refused_in_one_line(
    tiny_run, tmp_path, monkeypatch, capsys, name, stage
):
    names = ("gpt.pt", "sae.pt", "reference_cache.pt", "policy.pt")
    out_dir = copy_outputs(tiny_run, tmp_path, *names)
    marker = tmp_path / "code_ran"
    torch.save({"kind": name.split(".")[0], "config": {}, "made_from": {}, "x": RunsCode(marker)},
               out_dir / name)
    code, stderr = run_main_as_script(monkeypatch, capsys, *tiny_run[1], "--out_dir",
                                      str(out_dir), *stage)
    assert not marker.exists()
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"error: {out_dir / name} is not a readable checkpoint")


@pytest.mark.slow
def test_a_checkpoint_of_another_code_version_is_one_error_line(
    tiny_run, tmp_path, monkeypatch, capsys
):
    out_dir = copy_outputs(tiny_run, tmp_path, "gpt.pt", "sae.pt")
    ckpt = torch.load(out_dir / "gpt.pt", weights_only=True)
    ckpt["state_dict"]["renamed.weight"] = ckpt["state_dict"].pop("lm_head.weight")
    torch.save(ckpt, out_dir / "gpt.pt")
    code, stderr = run_main_as_script(monkeypatch, capsys, *tiny_run[1], "--out_dir",
                                      str(out_dir), "--stage", "sae")
    assert code == 2 and "Traceback" not in stderr
    assert stderr.startswith(f"error: {out_dir / 'gpt.pt'} does not fit this code's model")


def test_write_is_whole_or_absent_and_a_directory_in_the_way_is_one_error(tmp_path):
    path = tmp_path / "results.json"
    runtime.write_json(path, {"a": 1})
    assert runtime.read_json(path, "rerun") == {"a": 1}
    (tmp_path / "blocked.json").mkdir()
    with pytest.raises(runtime.UsageError, match=r"could not write .*blocked\.json"):
        runtime.write_json(tmp_path / "blocked.json", {"a": 1})
    (tmp_path / "a_file").write_text("")
    with pytest.raises(runtime.UsageError, match="could not write"):
        runtime.write_text(tmp_path / "a_file" / "below_it.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "blocked.json", "results.json"]


def test_a_read_only_disk_is_one_error_even_when_the_cleanup_fails(tmp_path, monkeypatch):
    """On a read-only disk the rename fails and so does removing the temporary file: still one
    `could not write` error, and the earlier good file is untouched."""
    path = tmp_path / "results.json"
    runtime.write_json(path, {"good": True})

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(runtime.os, "replace", read_only)
    monkeypatch.setattr(runtime.Path, "unlink", read_only)
    with pytest.raises(runtime.UsageError, match="could not write .*Read-only file system"):
        runtime.write_json(path, {"good": False})
    monkeypatch.undo()
    assert runtime.read_json(path, "rerun") == {"good": True}


@pytest.mark.parametrize("content", ["", '{"a": 1', "[1, 2", "\x00\x01", "[" * 100_000])
def test_a_truncated_or_foreign_json_file_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(runtime.UsageError, match=r"results\.json is not readable JSON"):
        runtime.read_json(path, "rerun `--stage eval`")


def test_a_json_path_that_is_a_directory_is_one_error(tmp_path):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(runtime.UsageError, match="not readable JSON"):
        runtime.read_json(tmp_path / "results.json", "rerun")


def test_one_run_per_out_dir_names_the_holder_and_takes_over_a_dead_ones_lock(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(str(holder.pid))
        with pytest.raises(runtime.UsageError, match=f"in use by process {holder.pid}"):
            with runtime.out_dir_lock(str(tmp_path)):
                pytest.fail("ran beside a live holder")
    finally:
        holder.kill()
        holder.wait()
    with runtime.out_dir_lock(str(tmp_path)):  # the holder is gone: its lock is taken over
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert f"left by process {holder.pid} that is gone" in capsys.readouterr().out
    assert not (tmp_path / ".lock").exists()  # released at the end
    with runtime.out_dir_lock(str(tmp_path)):  # and free for the next run
        pass


def test_a_second_pipeline_on_a_held_out_dir_stops_before_any_training(tmp_path, no_training):
    (tmp_path / ".lock").write_text(str(os.getppid()))  # pytest's parent: alive
    with pytest.raises(runtime.UsageError, match=f"in use by process {os.getppid()}"):
        train.main(TINY + ["--out_dir", str(tmp_path)])


def test_a_fresh_empty_lock_counts_as_held(tmp_path):
    """Between creating the lock and writing its pid, another run sees an empty file."""
    (tmp_path / ".lock").write_text("")
    with pytest.raises(runtime.UsageError, match="in use"):
        with runtime.out_dir_lock(str(tmp_path)):
            pass
    stale = time.time() - 60
    os.utime(tmp_path / ".lock", (stale, stale))
    with runtime.out_dir_lock(str(tmp_path)):
        pass


def test_pairs_that_become_identical_once_cut_are_dropped_with_a_count(capsys):
    """A 5-token context keeps 4 tokens of each response: the first pair's differ only later."""
    enc = data.load_tokenizer()
    prompt = "review the soup :"
    same = data.PreferencePair(prompt, " the soup was great .", " the soup was great !")
    differ = data.PreferencePair(prompt, " we loved the soup .", " the soup was awful .")
    kept = train.tokenize([same, differ], enc, 5, "training")
    assert [pair.chosen_ids for pair in kept] == [data.encode(enc, differ.chosen)[:4]]
    printed = capsys.readouterr().out
    assert "dropped 1 training pairs whose chosen and rejected responses are the same" in printed


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, stage, message, unsaved",
    [
        (["--pretrain_lr", "1e10", "--pretrain_steps", "1"], "pretrain", "--pretrain_lr", "gpt.pt"),
        (["--sae_lr", "1e10", "--sae_steps", "2"], "sae", "--sae_lr", "sae.pt"),
        (["--pref_lr", "1e10", "--pref_steps", "1"], "prefer", "--pref_lr", "policy.pt"),
    ],
)
def test_non_finite_weights_stop_their_stage_blaming_its_flag(
    tiny_run, tmp_path, monkeypatch, capsys, flags, stage, message, unsaved
):
    out_dir = copy_outputs(tiny_run, tmp_path, "gpt.pt", "sae.pt", "reference_cache.pt")
    (out_dir / unsaved).unlink(missing_ok=True)
    code, stderr = run_main_as_script(monkeypatch, capsys, *tiny_run[1], "--out_dir",
                                      str(out_dir), "--stage", stage, *flags)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"error: {stage}: ") and message in stderr
    assert not (out_dir / unsaved).exists()


MICRO = TINY + ["--pretrain_steps", "20", "--sae_steps", "10", "--pref_steps", "4"]
MICRO += ["--log_every", "1", "--n_eval_prompts", "4", "--max_new_tokens", "8"]


@pytest.mark.slow
def test_a_closed_stdout_ends_quietly_and_the_run_goes_on(tmp_path):
    reader_gone = subprocess.run(
        f"{sys.executable} train.py {' '.join(MICRO)} --out_dir {tmp_path} | head -1",
        shell=True, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert reader_gone.stdout.startswith("device: cpu")
    assert reader_gone.stderr == ""
    assert (tmp_path / "results.json").exists()  # every stage ran after the reader left


@pytest.mark.slow
def test_output_survives_an_ascii_only_terminal(tiny_run):
    """The runs table's mean row prints a '±': escaped, not a UnicodeEncodeError."""
    out_dir, _ = tiny_run
    done = subprocess.run(
        [sys.executable, "-m", "experiments.runs", str(out_dir)],  # the runs table
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=os.environ | {"PYTHONIOENCODING": "ascii"},
    )
    assert done.returncode == 0, done.stderr
    assert "| mean \\xb1 std |" in done.stdout


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_path_that_is_not_a_file_is_one_error_line(tmp_path, kind):
    """A directory (or a FIFO, which reading would wait on forever) where out_dir/.lock goes."""
    lock = tmp_path / ".lock"
    if kind == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    with pytest.raises(runtime.UsageError) as refused, runtime.out_dir_lock(str(tmp_path)):
        pass
    assert str(refused.value) == f"{lock} is not a lock file: remove it (rm -r {lock}), then rerun"
