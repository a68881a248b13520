"""Every setting is checked before any work, every artifact is checked against its inputs, and
--resume never mixes two runs: each fault is one `error:` line and exit code 2.

The per-flag cases are built from train.Config itself: a flag added without a bad-value case here
fails `test_every_flag_refuses_an_out_of_range_value`.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

import config
import data
import train
from conftest import REPO, copy_outputs, interrupt_at, run_main_as_script
from helpers import GOOD_ROW, TINY, jsonl
from runtime import Interrupted

CPU = torch.device("cpu")

# Every flag of `python train.py --help`, read from the config dataclasses the parser is built from.
ALL_FLAGS = [
    f.name for section in dataclasses.fields(train.Config) for f in dataclasses.fields(section.type)
]

# flag: [(argv, the error's text)], checked by train.parse_args alone (defaults: 2 blocks, d_sae
# 256, block_size 64). The text names the flag and the value; the message must start with the flag.
PARSE_CASES = {
    # RunConfig
    "stage": [(["--stage", "x"], "--stage: invalid choice: 'x' (choose from 'all', 'pretrain',")],
    "out_dir": [
        (["--out_dir", ""], "--out_dir '': must be a directory name"),
        (["--out_dir", "  "], "--out_dir '  ': must be a directory name"),
    ],
    "seed": [
        (["--seed", "12345678901234567890123"],
         "--seed 12345678901234567890123: must be below 2**32"),
        (["--seed", "-1"], "--seed -1: must be >= 0"),
        (["--seed", "1.5"], "--seed: invalid int value: '1.5'"),
    ],
    "device": [
        (["--device", "tpu"],
         "--device: invalid choice: 'tpu' (choose from 'auto', 'cuda', 'mps', 'cpu')"),
    ],
    "resume": [(["--resume=x"], "--resume: ignored explicit argument 'x'")],
    "skip_bad_rows": [
        (["--skip_bad_rows=yes"], "--skip_bad_rows: ignored explicit argument 'yes'"),
    ],
    "fpo_stop_grad": [(["--fpo_stop_grad=no"], "--fpo_stop_grad: ignored explicit argument 'no'")],
    "fpo_latent_weights": [
        (["--fpo_latent_weights", bad],
         f"--fpo_latent_weights '{bad}': must be latent:weight pairs, each latent below "
         "--d_sae 256 once, e.g. 3:0,17:4")
        for bad in (
            "3;4", "3", "3:", ",", "3:1,", "3:-1", "3:inf", "3:nan", "3:1e3", "3:1:2", "256:1",
            "3:1,3:2",
        )
    ],
    "threads": [
        (["--threads", "-1"], "--threads -1: must be >= 0"),
        (["--threads", "two"], "--threads: invalid int value: 'two'"),
    ],
    "log_every": [
        (["--log_every", "-1"], "--log_every -1: must be > 0"),
        (["--log_every", "0"], "--log_every 0: must be > 0"),
    ],
    # PretrainConfig
    "n_layer": [(["--n_layer", "0"], "--n_layer 0: must be > 0")],
    "n_head": [
        (["--n_head", "3", "--n_embd", "128"], "--n_head 3: must be a divisor of --n_embd 128"),
        (["--n_head", "0"], "--n_head 0: must be > 0"),
    ],
    "n_embd": [(["--n_embd", "0"], "--n_embd 0: must be > 0")],
    "block_size": [
        (["--block_size", "100000"], "--block_size 100000: must be at most 2048"),
        (["--block_size", "0"], "--block_size 0: must be > 0"),
    ],
    "n_docs": [(["--n_docs", "0"], "--n_docs 0: must be > 0")],
    "pretrain_steps": [(["--pretrain_steps", "-1"], "--pretrain_steps -1: must be > 0")],
    "pretrain_batch_size": [
        (["--pretrain_batch_size", "0"], "--pretrain_batch_size 0: must be > 0"),
    ],
    "pretrain_lr": [
        (["--pretrain_lr", "-1"], "--pretrain_lr -1.0: must be > 0"),
        (["--pretrain_lr", "nan"], "--pretrain_lr nan: must be a finite number"),
    ],
    # SAEConfig
    "sae_layer": [
        (["--sae_layer", "99"], "--sae_layer 99: must be a block of the 2-block GPT: -2 to 1"),
        (["--sae_layer", "-5"], "--sae_layer -5: must be a block of the 2-block GPT: -2 to 1"),
        (["--sae_layer", "2"], "--sae_layer 2: must be a block of the 2-block GPT: -2 to 1"),
    ],
    "d_sae": [(["--d_sae", "0"], "--d_sae 0: must be > 0")],
    "sae_k": [
        (["--sae_k", "0"], "--sae_k 0: must be > 0"),
        (["--sae_k", "257"], "--sae_k 257: must be at most --d_sae 256"),
    ],
    "sae_tokens": [(["--sae_tokens", "10"], "--sae_tokens 10: must be at least --block_size 64")],
    "sae_eval_tokens": [
        (["--sae_eval_tokens", "0"], "--sae_eval_tokens 0: must be > 0"),
        (["--sae_eval_tokens", "63"], "--sae_eval_tokens 63: must be at least --block_size 64"),
    ],
    "sae_steps": [(["--sae_steps", "0"], "--sae_steps 0: must be > 0")],
    "sae_batch_size": [(["--sae_batch_size", "0"], "--sae_batch_size 0: must be > 0")],
    "sae_lr": [
        (["--sae_lr", "-1"], "--sae_lr -1.0: must be > 0"),
        (["--sae_lr", "nan"], "--sae_lr nan: must be a finite number"),
    ],
    # PreferenceConfig
    "method": [
        (["--method", "ppo"],
         "--method: invalid choice: 'ppo' (choose from 'fpo', 'fpo_kl', 'dpo', 'dpo_offline', "
         "'simpo', 'tdpo1', 'tdpo2')"),
    ],
    "n_pairs": [(["--n_pairs", "0"], "--n_pairs 0: must be > 0")],
    "n_test_pairs": [(["--n_test_pairs", "0"], "--n_test_pairs 0: must be > 0")],
    "beta": [
        (["--beta", "nan"], "--beta nan: must be a finite number"),
        (["--beta", "0"], "--beta 0.0: must be > 0"),
    ],
    "alpha": [
        (["--alpha", "-inf"], "--alpha -inf: must be a finite number"),
        (["--alpha", "-1"], "--alpha -1.0: must be >= 0"),
    ],
    "fpo_k": [
        (["--fpo_k", "-1"], "--fpo_k -1: must be > 0"),
        (["--fpo_k", "0"], "--fpo_k 0: must be > 0"),
    ],
    "gamma": [(["--gamma", "nan"], "--gamma nan: must be a finite number")],
    "pref_steps": [(["--pref_steps", "0"], "--pref_steps 0: must be > 0")],
    "pref_batch_size": [(["--pref_batch_size", "0"], "--pref_batch_size 0: must be > 0")],
    "pref_lr": [
        (["--pref_lr", "-1"], "--pref_lr -1.0: must be > 0"),
        (["--pref_lr", "nan"], "--pref_lr nan: must be a finite number"),
        # a negative number in exponent form is a value, not an option
        (["--pref_lr", "-1e-3"], "--pref_lr -0.001: must be > 0"),
    ],
    "warmup_steps": [(["--warmup_steps", "-1"], "--warmup_steps -1: must be >= 0")],
    "grad_clip": [(["--grad_clip", "-1"], "--grad_clip -1.0: must be > 0")],
    # EvalConfig
    "eval_split": [
        (["--eval_split", "train"],
         "--eval_split: invalid choice: 'train' (choose from 'test', 'validation')"),
    ],
    "n_eval_prompts": [
        (["--n_eval_prompts", "-1"], "--n_eval_prompts -1: must be >= 0"),
        (["--n_eval_prompts", "193"],
         "--n_eval_prompts 193: must be at most 192 (the test split's distinct prompts)"),
        (["--n_eval_prompts", "97", "--eval_split", "validation"],
         "--n_eval_prompts 97: must be at most 96 (the validation split's distinct prompts)"),
    ],
    "temperature": [
        (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
        (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    ],
    "top_k": [(["--top_k", "-5"], "--top_k -5: must be >= 0")],
    "max_new_tokens": [(["--max_new_tokens", "-1"], "--max_new_tokens -1: must be > 0")],
}
# Flags whose bad values show only once the data is read (check_inputs_and_outputs): see below.
DATA_FLAGS = {"corpus_file", "preference_file"}
OTHER_CASES = [
    (["--foo"], "unknown option(s) --foo; `python train.py --help` lists them"),
    (["--pref", "1e-3"], "unknown option(s) --pref 1e-3;"),  # no abbreviations
    (["--seed"], "--seed: expected one argument"),
]
CASES = [
    (flag, argv, text)
    for flag in ALL_FLAGS if flag not in DATA_FLAGS
    for argv, text in PARSE_CASES.get(flag, [(None, None)])
]
CASES += [("(other)", argv, text) for argv, text in OTHER_CASES]


def test_the_flags_are_the_config_fields_and_every_one_has_a_case():
    assert set(vars(config.build_parser("").parse_args([]))) == set(ALL_FLAGS)
    assert not set(PARSE_CASES) - set(ALL_FLAGS), "cases for flags that no longer exist"
    assert DATA_FLAGS <= set(ALL_FLAGS)


@pytest.mark.parametrize(
    "flag, argv, text", CASES,
    ids=[f"{flag}:{' '.join(argv or ['missing'])}" for flag, argv, text in CASES],
)
def test_every_flag_refuses_an_out_of_range_value(flag, argv, text):
    if argv is None:
        pytest.fail(f"--{flag} has no bad-value case in PARSE_CASES: add one "
                    "(or to DATA_FLAGS, with a test)")
    with pytest.raises(train.UsageError) as error:
        train.parse_args(argv)
    message = str(error.value)
    assert message.startswith(text if flag == "(other)" else f"--{flag}") and text in message


@pytest.mark.parametrize("argv", [
    ["--grad_clip", "-1"], ["--method", "ppo"], ["--seed", "1.5"], ["--resume=x"], ["--foo"],
    ["--alpha", "-inf"],
])
def test_the_main_block_prints_the_refusal_as_one_error_line_and_exits_2(
    argv, no_training, monkeypatch, capsys
):
    with pytest.raises(train.UsageError) as error:
        train.parse_args(argv)
    # train.py's own `__main__` block, in this process
    code, stderr = run_main_as_script(monkeypatch, capsys, *argv)
    assert (code, stderr) == (2, f"error: {error.value}\n")


def test_a_2_block_gpt_takes_layers_minus_2_to_1_and_a_1_block_gpt_only_its_block():
    for layer in ("-2", "-1", "0", "1"):
        train.parse_args(["--sae_layer", layer])
    train.parse_args(["--n_layer", "1", "--sae_layer", "-1"])
    with pytest.raises(
        train.UsageError, match=r"^--sae_layer 1: must be a block of the 1-block GPT: -1 to 0$"
    ):
        train.parse_args(["--n_layer", "1", "--sae_layer", "1"])


# ---- data-dependent limits and --out_dir: found at start-up, before any training -------------


def refused_at_start(monkeypatch, capsys, argv) -> str:
    """train.main refuses argv before any stage runs (no_training), and the `__main__` block turns
    that into one `error:` line and exit code 2. Returns the line."""
    with pytest.raises((train.UsageError, data.DataError)):
        train.main(argv)
    capsys.readouterr()
    code, stderr = run_main_as_script(monkeypatch, capsys, *argv)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr.strip()


def test_missing_corpus_or_preference_file_is_refused_at_start(
    tmp_path, no_training, monkeypatch, capsys
):
    out = ["--out_dir", str(tmp_path / "out")]
    for flag in sorted(DATA_FLAGS):
        line = refused_at_start(
            monkeypatch, capsys, TINY + out + [f"--{flag}", str(tmp_path / "missing.txt")]
        )
        assert line == (
            f"error: {tmp_path / 'missing.txt'}: cannot read file (No such file or directory)"
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, text", [
    (["--n_docs", "1"],
     "error: the toy corpus (--n_docs 1): too short: 12 tokens, at least 240 "
     "(5 x --block_size 48) are needed"),
    (["--block_size", "2048", "--sae_eval_tokens", "2048", "--n_docs", "100"],
     "error: the toy corpus (--n_docs 100): too short: 2049 tokens, at least 10240 "
     "(5 x --block_size 2048) are needed"),
])
def test_a_corpus_too_short_for_the_context_is_refused_at_start(
    tmp_path, no_training, monkeypatch, capsys, extra, text
):
    assert refused_at_start(
        monkeypatch, capsys, TINY + ["--out_dir", str(tmp_path / "out")] + extra
    ) == text
    assert not (tmp_path / "out").exists()


def test_a_small_corpus_file_with_a_long_context_is_refused_at_start(
    tmp_path, no_training, monkeypatch, capsys
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the soup was great .\n\n" * 200)
    line = refused_at_start(monkeypatch, capsys, TINY + [
        "--out_dir", str(tmp_path / "out"), "--corpus_file", str(corpus), "--block_size", "2048",
        "--sae_eval_tokens", "2048",
    ])
    assert line.startswith(f"error: {corpus}: too short: ") and line.endswith(
        "at least 10240 (5 x --block_size 2048) are needed"
    )


@pytest.mark.parametrize("where, reason", [
    ("a_file", "File exists"),
    ("a_file/out", "Not a directory"),
    ("x" * 300, "File name too long"),  # cannot be created, even by root
])
def test_an_out_dir_that_cannot_be_a_directory_is_refused_at_start(
    tmp_path, no_training, monkeypatch, capsys, where, reason
):
    (tmp_path / "a_file").write_text("not a directory")
    out_dir = tmp_path / where
    line = refused_at_start(monkeypatch, capsys, TINY + ["--out_dir", str(out_dir)])
    assert line == f"error: --out_dir {str(out_dir)!r} cannot be written to ({reason})"
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_a_preference_row_nested_100000_deep_is_a_line_numbered_data_error(
    tmp_path, no_training, monkeypatch, capsys
):
    path = tmp_path / "prefs.jsonl"
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "chosen": "a", "rejected": "b"}'
    path.write_bytes(jsonl(GOOD_ROW, GOOD_ROW, deep, GOOD_ROW))
    with pytest.raises(data.DataError, match=rf"^{path}, line 3: "):
        data.load_preferences(path)
    assert data.load_preferences(path, skip_bad_rows=True)[1] == 1
    assert refused_at_start(
        monkeypatch, capsys,
        TINY + ["--out_dir", str(tmp_path / "out"), "--preference_file", str(path)],
    ).startswith(f"error: {path}, line 3: ")


def test_a_utf8_bom_starts_a_preference_or_corpus_file_without_harm(tmp_path):
    prefs, corpus = tmp_path / "prefs.jsonl", tmp_path / "corpus.txt"
    prefs.write_bytes(b"\xef\xbb\xbf" + jsonl(*[GOOD_ROW] * 6))
    corpus.write_bytes(b"\xef\xbb\xbfthe soup was great .\n\nthe soup was awful .\n")
    pairs, dropped = data.load_preferences(prefs)
    assert dropped == 0 and pairs[0] == data.PreferencePair(**GOOD_ROW)
    # no U+FEFF in the first document
    assert data.load_corpus(corpus) == ["the soup was great .", "the soup was awful ."]


@pytest.mark.slow
def test_cli_refusals_are_one_line_exit_2_fast_and_write_nothing(tmp_path):
    """A range check and the file system through a real `python train.py`, both started at
    once: each must end within seconds. Every flag's check, argparse's own refusals and the
    data's are tested in this process (test_every_flag_refuses_an_out_of_range_value,
    test_the_main_block_prints_the_refusal_as_one_error_line_and_exits_2 and others)."""
    (tmp_path / "a_file").write_text("")
    cases = {
        "lr": ["--pref_lr", "-1e-3"],
        "out_dir": [*TINY, "--out_dir", str(tmp_path / "a_file" / "out")],
    }
    started, processes = time.time(), {}
    for name, args in cases.items():
        out = [] if "--out_dir" in args else ["--out_dir", str(tmp_path / name)]
        processes[name] = subprocess.Popen(
            [sys.executable, "train.py", *args, *out], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, (name, stderr)
        assert ("Traceback" not in stderr and len(stderr.splitlines()) == 1
                and stderr.startswith("error: ")), (name, stderr)
        assert "== pretrain ==" not in stdout and not (tmp_path / name).exists(), name
    # two interpreters importing torch on a shared machine: seconds each
    assert time.time() - started < 30
    assert not list(tmp_path.rglob("*.pt"))


# ---- artifacts made from other inputs --------------------------------------------------------


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """gpt.pt (seed 7, 5 steps), its sae.pt (5 steps) and its reference_cache.pt: the same shapes
    as the tiny run's, made from other weights."""
    out_dir = tmp_path_factory.mktemp("other_run")
    argv = TINY + ["--out_dir", str(out_dir), "--seed", "7"]
    train.main(argv + ["--stage", "pretrain", "--pretrain_steps", "5"])
    train.main(argv + ["--stage", "sae", "--sae_steps", "5"])
    train.main(argv + ["--stage", "cache"])
    return out_dir


def swap_in(other_run, out_dir, name: str) -> None:
    shutil.copy(other_run / name, out_dir / name)


@pytest.mark.slow
def test_gpt_of_another_run_is_refused_by_cache_prefer_and_eval_naming_the_sae_to_rebuild(
    tiny_run, other_run, tmp_path, monkeypatch, capsys
):
    out_dir = copy_outputs(
        tiny_run, tmp_path, "gpt.pt", "sae.pt", "reference_cache.pt", "policy.pt"
    )
    swap_in(other_run, out_dir, "gpt.pt")
    cache_before = (out_dir / "reference_cache.pt").read_bytes()
    refusal = f"{out_dir / 'sae.pt'} was made from another GPT than this run's: rerun `--stage sae`"
    for stage in ("cache", "prefer", "eval"):
        with pytest.raises(train.UsageError) as error:
            train.main(TINY + ["--out_dir", str(out_dir), "--stage", stage])
        assert str(error.value) == refusal, stage
    code, stderr = run_main_as_script(
        monkeypatch, capsys, *TINY, "--out_dir", str(out_dir), "--stage", "eval"
    )
    assert (code, stderr) == (2, f"error: {refusal}\n")
    assert ((out_dir / "reference_cache.pt").read_bytes() == cache_before
            and not (out_dir / "results.json").exists())


@pytest.mark.slow
def test_sae_of_another_gpt_is_refused_by_cache_and_prefer(tiny_run, other_run, tmp_path):
    out_dir = copy_outputs(tiny_run, tmp_path, "gpt.pt", "reference_cache.pt")
    swap_in(other_run, out_dir, "sae.pt")
    for stage in ("cache", "prefer"):
        with pytest.raises(
            train.UsageError,
            match=rf"^{out_dir / 'sae.pt'} was made from another GPT than this run's: "
            r"rerun `--stage sae`$",
        ):
            train.main(TINY + ["--out_dir", str(out_dir), "--stage", stage])
    assert not (out_dir / "policy.pt").exists() and not (out_dir / "policy_log.jsonl").exists()


@pytest.mark.slow
def test_cache_of_another_gpt_and_sae_rebuilds_itself_to_the_right_one(
    tiny_run, other_run, tmp_path, capsys
):
    out_dir = copy_outputs(tiny_run, tmp_path, "gpt.pt", "sae.pt")
    swap_in(other_run, out_dir, "reference_cache.pt")
    cfg = train.parse_args(TINY + ["--out_dir", str(out_dir)])
    inputs = train.load_preference_inputs(cfg, *train.load_gpt(cfg, CPU), CPU)
    assert (
        f"cache: {out_dir / 'reference_cache.pt'} is stale: it was built from another reference "
        "model and SAE" in capsys.readouterr().out
    )
    rebuilt = torch.load(out_dir / "reference_cache.pt", weights_only=False)
    expected = torch.load(tiny_run[0] / "reference_cache.pt", weights_only=False)
    assert rebuilt["made_from"] == expected["made_from"] and torch.equal(
        rebuilt["avg_logps"], expected["avg_logps"]
    )
    assert torch.equal(inputs.cache["avg_logps"], expected["avg_logps"])
    train.load_preference_inputs(cfg, *train.load_gpt(cfg, CPU), CPU)
    assert "cache:" not in capsys.readouterr().out  # now it matches, and is reused


@pytest.mark.slow
def test_policy_of_another_reference_is_refused_by_eval(tiny_run, other_run, tmp_path):
    """Same architecture, so only the fingerprints tell: policy.pt was trained from the tiny run's
    GPT."""
    for name in ("gpt.pt", "sae.pt", "reference_cache.pt"):
        swap_in(other_run, tmp_path, name)
    copy_outputs(tiny_run, tmp_path, "policy.pt")
    with pytest.raises(
        train.UsageError,
        match=rf"^{tmp_path / 'policy.pt'} was made from another reference model and SAE than "
        r"this run's: rerun `--stage prefer`$",
    ):
        train.main(TINY + ["--out_dir", str(tmp_path), "--seed", "7", "--stage", "eval"])
    assert not (tmp_path / "results.json").exists()


# ---- --resume with other settings --------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_a_changed_method_or_lr_and_eval_records_how_the_policy_was_trained(
    tiny_run, tmp_path, monkeypatch, capsys
):
    out_dir = copy_outputs(tiny_run, tmp_path, "gpt.pt", "sae.pt", "reference_cache.pt")
    argv = TINY + ["--out_dir", str(out_dir), "--pref_steps", "8", "--n_eval_prompts", "4",
                   "--max_new_tokens", "8"]
    monkeypatch.setattr(train, "batch_indices", interrupt_at(3)(train.batch_indices))
    with pytest.raises(Interrupted, match="prefer interrupted at step 4"):
        train.main(argv + ["--stage", "prefer"])
    monkeypatch.undo()
    resume_file = out_dir / "policy.resume.pt"
    saved = resume_file.read_bytes()

    for changed, shown in (
        (["--method", "simpo"], "--method 'fpo' (now 'simpo')"),
        (["--pref_lr", "0.01"], "--pref_lr 0.001 (now 0.01)"),
    ):
        with pytest.raises(train.UsageError) as error:
            # --stage all: the finished stages are skipped, prefer resumes
            train.main(argv + ["--resume", *changed])
        assert str(error.value) == (
            f"--resume: {resume_file} was saved with {shown}; rerun with those settings, "
            "or delete it to start over"
        )
        assert resume_file.read_bytes() == saved and not (out_dir / "policy.pt").exists()

    train.main(argv + ["--resume"])  # unchanged: finishes
    assert not resume_file.exists()
    assert [
        json.loads(line)["step"]
        for line in (out_dir / "policy_log.jsonl").read_text().splitlines()
    ] == list(range(8))
    first = json.loads((out_dir / "results.json").read_text())
    policy = (out_dir / "policy.pt").read_bytes()
    capsys.readouterr()

    # after a finished run, new training flags change nothing: eval only, and the record says how
    # policy.pt was trained
    train.main(argv + ["--resume", "--pref_steps", "5", "--pref_lr", "0.5", "--pretrain_steps", "7",
                       "--sae_lr", "0.5"])
    assert (f"prefer: finished earlier ({out_dir / 'policy'}.pt); skipped (--resume)"
            in capsys.readouterr().out)
    results = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "policy.pt").read_bytes() == policy
    assert (results["trained_with"]["pref_steps"] == 8
            and results["trained_with"]["pref_lr"] == 1e-3
            and results["trained_with"]["method"] == "fpo")
    assert (results["config"]["PreferenceConfig"]["pref_steps"] == 8
            and results["config"]["PreferenceConfig"]["pref_lr"] == 1e-3)
    # the GPT and the SAE skipped too: as they were made
    tiny = json.loads((tiny_run[0] / "results.json").read_text())["config"]
    assert (results["config"]["PretrainConfig"] == tiny["PretrainConfig"]
            and results["config"]["SAEConfig"] == tiny["SAEConfig"])
    assert (results["config"]["PretrainConfig"]["pretrain_steps"] != 7
            and results["config"]["SAEConfig"]["sae_lr"] != 0.5)
    assert (results["reward_accuracy"] == first["reward_accuracy"]
            and results["feature_mse"] == first["feature_mse"])
