"""The pipeline end to end, at a tiny scale: it runs, learns, reproduces, and compares."""

import gc
import json
import math

import pytest
import torch

import data
import train
from conftest import TINY
from model import GPT


def numbers_of(results: dict) -> dict:
    """The numeric leaves of a results dict, for exact comparison."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in numbers_of(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def test_tiny_run_learns_toward_the_chosen_responses(tiny_run):
    out_dir, _ = tiny_run
    results = json.loads((out_dir / "results.json").read_text())
    # rewards are log-prob changes against the reference: at the start every pair ties at 0,
    # so accuracy > 0 means the policy has moved chosen up relative to rejected on held-out pairs
    assert results["reward_accuracy"] >= 0.75
    log = [json.loads(line) for line in (out_dir / "policy_log.jsonl").read_text().splitlines()]
    assert log[-1]["margin"] > log[0]["margin"] + 1.0
    assert log[-1]["loss"] < log[0]["loss"]
    for key, value in numbers_of(results).items():
        assert math.isfinite(value), key
    for name in ("gpt.pt", "sae.pt", "sae_metrics.json", "reference_cache.pt", "policy.pt"):
        assert (out_dir / name).exists()


def test_same_seed_same_numbers_and_a_stage_rerun_alone_reproduces(tiny_run, tmp_path):
    out_dir, argv = tiny_run
    first = numbers_of(json.loads((out_dir / "results.json").read_text()))
    train.main(TINY + ["--out_dir", str(tmp_path)])
    assert numbers_of(json.loads((tmp_path / "results.json").read_text())) == first
    train.main(argv + ["--stage", "eval"])  # reuses the saved policy, cache and reference
    assert numbers_of(json.loads((out_dir / "results.json").read_text())) == first


def test_preference_training_holds_no_reference_model(tiny_run, monkeypatch):
    """During FPO training exactly one GPT exists (the policy); DPO's online reference makes two."""
    out_dir, argv = tiny_run
    live_gpts = []
    original_step = train.training_step

    def counting_step(*args, **kwargs):
        gc.collect()
        live_gpts.append(sum(type(obj) is GPT for obj in gc.get_objects()))
        return original_step(*args, **kwargs)

    monkeypatch.setattr(train, "training_step", counting_step)
    run, pre, sae_cfg, pref, _ = train.parse_args(argv + ["--pref_steps", "2"])
    for method, expected in (("fpo", 1), ("dpo", 2)):
        live_gpts.clear()
        pref.method = method
        train.train_preference(run, pre, sae_cfg, pref, train.pick_device("cpu"), seed=0, tag=f"count_{method}")
        assert live_gpts == [expected, expected], method


def test_frozen_sae_and_reference_get_no_gradient(tiny_run):
    _, argv = tiny_run
    run, pre, sae_cfg, pref, _ = train.parse_args(argv)
    device = train.pick_device("cpu")
    enc, policy, sae, cache, train_tok, _ = train.prepare_preference(run, pre, sae_cfg, pref, device)
    reference = train.load_gpt(run, pre, device).eval().requires_grad_(False)
    frozen_before = [p.clone() for p in [*sae.parameters(), *reference.parameters()]]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    input_ids, mask = data.collate_pairs(train_tok[:4], data.eos_id(enc))
    for method in ("fpo", "tdpo2"):  # the SAE is in FPO's graph, the reference in TDPO's
        pref.method = method
        train.training_step(pref, policy, optimizer, (torch.arange(4), input_ids, mask), cache, sae, reference, sae_cfg.sae_layer, device, 0, None)
        assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in [*sae.parameters(), *reference.parameters()])
    for before, after in zip(frozen_before, [*sae.parameters(), *reference.parameters()]):
        assert torch.equal(before, after)


def test_compare_writes_a_finite_row_for_every_method(tiny_run):
    out_dir, argv = tiny_run
    train.main(argv + ["--compare", "--seeds", "1", "--pref_steps", "4"])
    table = (out_dir / "compare.md").read_text()
    rows = json.loads((out_dir / "compare.json").read_text())["rows"]
    assert {row["label"] for row in rows} == set(train.COMPARE_ROWS)
    for label in train.COMPARE_ROWS:
        assert f"| {label} |" in table
    for row in rows:
        for key in ("win_rate", "reward_accuracy", "feature_drift", "median_step_ms", "peak_memory_mb"):
            assert math.isfinite(row[key]), (row["label"], key)
        for key in ("judge_score", "valid_rate", "kl_from_reference", "entropy_per_token", "distinct_2", "mean_length"):
            assert math.isfinite(row["policy"][key]), (row["label"], key)


def test_bench_reports_every_method_and_the_ratios(tiny_run, capsys):
    out_dir, argv = tiny_run
    train.main(argv + ["--bench", "--bench_steps", "3"])
    bench = json.loads((out_dir / "bench.json").read_text())
    assert set(bench["methods"]) == set(train.COMPARE_ROWS)
    assert set(bench["ratios"]) == {"FPO/SimPO", "FPO/DPO", "FPO/TDPO-2"}
    assert all(value > 0 for value in bench["ratios"].values())
    assert "FPO/SimPO" in capsys.readouterr().out


def test_command_line_overrides_are_type_checked():
    run, pre, _, pref, _ = train.parse_args(["--beta", "0.5", "--n_layer", "2", "--resume"])
    assert pref.beta == 0.5 and pre.n_layer == 2 and run.resume is True
    with pytest.raises(train.UsageError, match="unknown option '--betta'"):
        train.parse_args(["--betta", "0.5"])
    with pytest.raises(train.UsageError, match="--n_layer: expected int, got 'two'"):
        train.parse_args(["--n_layer", "two"])
    with pytest.raises(train.UsageError, match="--method must be one of"):
        train.parse_args(["--method", "ppo"])


def test_every_config_field_has_help_text():
    for cls in train.CONFIG_CLASSES:
        assert set(train.field_help(cls)) == {f.name for f in train.dataclasses.fields(cls)}, cls.__name__
