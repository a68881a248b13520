"""Every experiment end to end at a tiny scale: it runs, writes its tables and pictures, and a
rerun on its finished out_dir trains nothing and writes the same tables. Also the experiments'
own training loop (train.py's policy, bit for bit), its memory meter and its child processes.
"""

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

import config
import runtime
import train
from experiments import bench, common, compare, paper, report, sweep
from experiments.__main__ import main
from experiments.bench import LoopPeakMemory
from experiments.settings import LabConfig
from experiments.tests import helpers
from experiments.tests.helpers import (
    QUICK_JUDGE, assert_one_colour_per_series, assert_points, drawn, fail_if_called, read,
    record_figures, tiny_reference,
)
from runtime import UsageError
from tests.helpers import TINY, numbers_of

CPU = torch.device("cpu")
DEFAULTS = config.PreferenceConfig()


# ---- the experiments' training loop, its memory meter, its child process ----------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fpo", "tdpo2"])
def test_the_experiments_loop_trains_train_py_s_policy_bit_for_bit(method, tiny_run, tmp_path):
    """train_policy (judged along the way) and train.train_preference give the same weights and
    the same log but for wall-clock time; the judge sees the policy where it stands, in eval mode
    and without gradients, and training stops where the judge says so."""
    reference = tiny_reference(tiny_run, tmp_path)
    argv = TINY + ["--out_dir", str(reference), "--pref_steps", "6", "--method", method]
    cfg = config.parse_args(argv)
    train.train_preference(cfg, CPU, seed=7, tag="core")
    seen = {}  # step: the policy's weights the judge saw

    def judge(step: int, policy) -> bool:
        assert not policy.training and not torch.is_grad_enabled()
        seen[step] = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
        return True

    common.train_policy(cfg, CPU, seed=7, tag="lab", judge_every=3, judge=judge)
    core, lab = (torch.load(reference / f"{tag}.pt", weights_only=True) for tag in ("core", "lab"))
    assert core["config"] == lab["config"] and core["made_from"] == lab["made_from"]
    for name, tensor in core["state_dict"].items():
        assert torch.equal(tensor, lab["state_dict"][name]), name
    assert sorted(seen) == [3, 6]
    assert all(torch.equal(tensor, seen[6][name]) for name, tensor in core["state_dict"].items())
    assert not list(reference.glob("lab_step*.pt"))  # nothing is saved along the way

    def without_time(tag: str) -> list[dict]:
        lines = (reference / f"{tag}_log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "ms_per_step"} for line in lines]

    assert without_time("lab") == without_time("core") and len(without_time("lab")) == 6
    # Stopped at its first judged point: the weights and log of the first 3 steps.
    common.train_policy(cfg, CPU, seed=7, tag="stopped", judge_every=3,
                        judge=lambda step, policy: False)
    stopped = torch.load(reference / "stopped.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(tensor, seen[3][name]) for name, tensor in stopped.items())
    assert not all(torch.equal(tensor, seen[6][name]) for name, tensor in stopped.items())
    assert without_time("stopped") == without_time("core")[:3]


def test_loop_memory_sees_a_tensor_allocated_inside_and_not_one_from_before():
    before = torch.zeros(1_000_000)  # 4 MB that the loop did not allocate
    with LoopPeakMemory(CPU) as memory:
        inside = torch.ones(2_000_000)  # 8 MB
        doubled = inside * 2  # 8 MB more, both live at once
        del inside, doubled
        before.add_(1)  # in place: allocates nothing
        view = before[:10]  # a view: allocates nothing
    assert 16 <= memory.loop_mb * 2**20 / 1e6 < 16.1, memory.loop_mb
    assert memory.tensors.live == 0 and view.shape == (10,)
    assert memory.rss_mb > 0


@pytest.mark.slow  # a child process (the first of a session starts the fork server: seconds)
def test_a_child_process_uses_this_process_thread_count():
    torch.set_num_threads(1)  # keep_thread_count puts it back
    assert common.in_child_process(torch.get_num_threads) == 1


# ---- --compare, --head_to_head, --bound, --bench ---------------------------------------------


@pytest.mark.slow  # starts worker processes
def test_workers_return_results_in_order_and_a_failure_is_one_line_naming_its_task(tmp_path):
    cfg = LabConfig()
    cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, workers=2))
    tasks = [(f"square root of {x}", math.sqrt, x) for x in (16.0, 9.0, 4.0)]
    assert common.run_all(cfg, tasks, "rerun") == [4.0, 3.0, 2.0]
    missing = tmp_path / "missing.json"
    tasks.insert(1, ("reading a file", runtime.read_json, missing, "make it"))
    with pytest.raises(UsageError) as refused:
        common.run_all(cfg, tasks, "rerun")
    assert str(refused.value) == f"reading a file: {missing} not found: make it"
    with pytest.raises(UsageError) as refused:  # a follow-up's failure, the same
        common.run_after(cfg, tasks[:1], lambda result: tasks[1:2], "rerun")
    assert str(refused.value) == f"reading a file: {missing} not found: make it"


def appeared(path: Path) -> bool:
    """Whether `path` exists within 60 s."""
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    return path.exists()


@pytest.mark.slow  # starts worker processes
@pytest.mark.parametrize("workers", [1, 2])
def test_follow_ups_start_once_their_task_ends_and_come_back_in_order(tmp_path, workers):
    cfg = LabConfig()
    cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, workers=workers))
    written = tmp_path / "written by the first task's follow-up"
    # The second task waits for a file that only the first task's follow-up writes: with 2
    # workers it appears only if that follow-up starts before every first task has ended.
    tasks = [("first", str, written), ("second", appeared, written)]

    def then(result):
        return [("follow-up", Path.write_text, written, "")] if result == str(written) else []

    results = common.run_after(cfg, tasks, then, "rerun")
    assert results == [(str(written), [0]), (True, [])]


@pytest.mark.slow
def test_workers_side_by_side_train_the_same_rows_as_one_after_another(
    tiny_run, tmp_path, monkeypatch
):
    """--workers 2 (two processes taking the rows in turn) against --workers 1, from scratch on
    two references: the same rows, in the same order, with the same numbers."""
    _, argv = tiny_run
    # Three rows: the offline cache, the reference online, and TDPO's per-token KL.
    rows_tried = {label: compare.COMPARE_ROWS[label] for label in ("FPO", "DPO", "TDPO-2")}
    monkeypatch.setattr(compare, "COMPARE_ROWS", rows_tried)
    rows = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        # references pretrained briefly: what is compared is the rows, not what they learn
        main(argv + QUICK_JUDGE + ["--out_dir", str(out), "--compare", "--seeds", "2",
                                   "--pretrain_steps", "30", "--sae_steps", "20",
                                   "--pref_steps", "4", "--threads", "1", "--workers",
                                   str(workers)])
        timing = ("median_step_ms", "config.ExperimentConfig.workers")
        rows[workers] = [{key: value for key, value in numbers_of(row).items()
                          if key not in timing} | {"label": row["label"]}
                         for row in read(out / "compare.json")["rows"]]
    assert len(rows[1]) == len(rows[2]) == 2 * len(compare.COMPARE_ROWS)
    for alone, side_by_side in zip(rows[1], rows[2]):
        differ = {key for key in alone | side_by_side if alone.get(key) != side_by_side.get(key)}
        assert not differ, (alone["label"], {key: (alone.get(key), side_by_side.get(key))
                                             for key in sorted(differ)})


@pytest.mark.slow
def test_compare_writes_a_finite_row_for_every_method(tiny_run, tmp_path):
    _, argv = tiny_run
    tiny_reference(tiny_run, tmp_path)
    main(argv + ["--out_dir", str(tmp_path), "--compare", "--seeds", "1", "--pref_steps", "4",
                 "--threads", "1", "--workers", "2"])
    table = (tmp_path / "compare.md").read_text()
    rows = read(tmp_path / "compare.json")["rows"]
    assert {row["label"] for row in rows} == set(compare.COMPARE_ROWS)
    assert table.startswith("| method | win rate |") and "| feature MSE D(y) | ms/step |" in table
    for label in compare.COMPARE_ROWS:
        assert f"| {label} |" in table
    for row in rows:
        for key in ("win_rate", "reward_accuracy", "implicit_reward_accuracy", "feature_mse",
                    "median_step_ms"):
            assert math.isfinite(row[key]), (row["label"], key)
        for key in ("judge_score", "valid_rate", "kl_from_reference", "entropy_per_token",
                    "distinct_2", "mean_length"):
            assert math.isfinite(row["policy"][key]), (row["label"], key)
    # FPO's row is config.py's defaults.
    fpo = next(row for row in rows if row["label"] == "FPO")["trained_with"]
    assert (fpo["beta"], fpo["alpha"]) == (DEFAULTS.beta, DEFAULTS.alpha)
    # The offline cache is exact: DPO reading the reference's summed log-probs from it trains the
    # same policy as DPO running the reference online, up to float rounding (the cache ran the
    # reference on batches padded to other lengths), so it samples the very same responses.
    online, offline = (numbers_of(next(row for row in rows if row["label"] == label))
                       for label in ("DPO", "DPO (offline cache)"))
    for key in ("win_rate", "reward_accuracy", "implicit_reward_accuracy", "policy.valid_rate",
                "policy.judge_score", "policy.mean_length", "policy.distinct_2"):
        assert online[key] == offline[key], key
    for key in ("feature_mse", "policy.kl_from_reference", "policy.entropy_per_token"):
        assert math.isclose(online[key], offline[key], rel_tol=1e-4), key


@pytest.mark.slow
def test_head_to_head_and_bound_read_the_compare_policies(tiny_run, tmp_path, monkeypatch):
    _, argv = tiny_run
    argv = argv + QUICK_JUDGE + ["--out_dir", str(tmp_path), "--threads", "1"]
    tiny_reference(tiny_run, tmp_path)
    rows = {label: compare.COMPARE_ROWS[label] for label in ("FPO", "SimPO", "DPO")}
    monkeypatch.setattr(compare, "COMPARE_ROWS", rows)
    main(argv + ["--compare", "--seeds", "1", "--pref_steps", "4", "--workers", "2"])
    monkeypatch.setattr(train, "preference_models", fail_if_called("head to head trained"))
    saved = record_figures(monkeypatch)
    main(argv + ["--head_to_head"])
    table = (tmp_path / "head_to_head.md").read_text()
    lines = table.splitlines()
    assert lines[0] == ("| FPO against | T = 0.2 | T = 0.4 | T = 0.6 | T = 0.8 | T = 1 | "
                        "above 0.5 | below 0.5 |")
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| SimPO", "| DPO"]
    assert lines[4] == ""
    for line in lines[2:4]:
        cells = line.split(" | ")[1:6]
        assert all(re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cell) for cell in cells)
    # The picture draws the table: each method's win rate and interval at every temperature.
    shown = drawn(saved["head_to_head.svg"])
    assert [label for _, label in shown] == ["SimPO", "DPO"]
    printed = helpers.table_rows(table, "FPO against")
    for label in ("SimPO", "DPO"):
        temperatures = compare.HEAD_TO_HEAD_TEMPERATURES
        assert_points(shown[0, label], [printed[label][f"T = {t:g}"] for t in temperatures])
    assert_one_colour_per_series(saved["head_to_head.svg"])
    # A rerun samples nothing and writes the same table.
    monkeypatch.setattr(compare, "sample_responses", fail_if_called("sampled again"))
    main(argv + ["--head_to_head"])
    assert (tmp_path / "head_to_head.md").read_text() == table
    # The judge's scores are kept per reference and temperature: one per method and test prompt.
    scores = read(tmp_path / "ref_seed1337" / "head_to_head_t1.json")["scores"]
    assert set(scores) == {"FPO", "SimPO", "DPO"} and len(scores["FPO"]) == 8
    # --bound reads the same policies (and trains FPO once more, along its steps): a row per
    # method, and the D(y)-SeqKL picture; at the compare's settings, whatever this command's say
    # (the rerun below, without these flags, writes the same tables).
    monkeypatch.undo()
    saved = record_figures(monkeypatch)
    # Two workers: the policies' terms and FPO's retraining side by side.
    main(argv + ["--bound", "--pref_steps", "10", "--fpo_k", "4", "--pref_batch_size", "2",
                 "--workers", "2"])
    bound = (tmp_path / "bound.md").read_text()
    lines = bound.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| FPO", "| SimPO", "| DPO"]
    assert lines[5] == ""
    assert all(0.0 <= float(line.split(" | ")[1]) <= 1.0 for line in lines[2:5])
    # ... and FPO trained once more (the compare's 4 steps), measured at every fifth of them.
    trajectory = [line.split(" | ")[0] for line in lines if re.match(r"\| \d", line)]
    assert trajectory == ["| 1", "| 2", "| 3", "| 4"]
    # The picture draws both tables of means, with their intervals.
    shown = drawn(saved["bound.svg"])
    assert [label for _, label in shown] == ["FPO", "SimPO", "DPO", "FPO along training"]
    means = helpers.table_rows(bound, "method", after="| method | SeqKL(y) | D(y) |")
    along = helpers.table_rows(bound, "FPO at step")
    for label, series, rows in [(label, shown[0, label], [means[label]]) for label in means] + [
        ("FPO along training", shown[0, "FPO along training"], list(along.values()))
    ]:
        assert_points(series, [row["SeqKL(y)"] for row in rows], axis="x", relative=True)
        assert_points(series, [row["D(y)"] for row in rows], relative=True)
    assert_one_colour_per_series(saved["bound.svg"])
    assert not list((tmp_path / "ref_seed1337").glob("bound_fpo_trajectory_step*.pt"))
    # A rerun in this one process trains nothing (the policies' terms are computed again) and
    # writes the same tables.
    monkeypatch.setattr(train, "preference_models", fail_if_called("bound trained again"))
    main(argv + ["--bound"])
    assert (tmp_path / "bound.md").read_text() == bound
    # Two workers (references and temperatures side by side) judge as one process does.
    monkeypatch.undo()
    for made in (tmp_path / "ref_seed1337").glob("head_to_head_t*.json"):
        made.unlink()
    main(argv + ["--head_to_head", "--workers", "2"])
    assert (tmp_path / "head_to_head.md").read_text() == table


@pytest.mark.slow
def test_bench_reports_every_method_and_the_ratios(tiny_run, tmp_path, capsys, monkeypatch):
    _, argv = tiny_run
    tiny_reference(tiny_run, tmp_path)
    # FPO and the three methods its ratios are taken against; each is measured in a process of
    # its own, which costs a torch import.
    rows = {label: compare.COMPARE_ROWS[label] for label in ("FPO", "SimPO", "DPO", "TDPO-2")}
    monkeypatch.setattr(compare, "COMPARE_ROWS", rows)
    monkeypatch.setattr(bench, "COMPARE_ROWS", rows)
    main(argv + ["--out_dir", str(tmp_path), "--bench", "--bench_steps", "3"])
    benched = read(tmp_path / "bench.json")
    assert set(benched["methods"]) == set(rows)
    assert set(benched["ratios"]) == {f"FPO/{other} {measure}"
                                      for other in ("SimPO", "DPO", "TDPO-2")
                                      for measure in ("time", "loop memory")}
    assert all(value > 0 for value in benched["ratios"].values())
    loop_mb = {label: values["loop_memory_mb"] for label, values in benched["methods"].items()}
    # the online reference's logits and TDPO's full-vocabulary KL are allocated inside the loop;
    # FPO needs neither
    assert loop_mb["FPO"] < loop_mb["DPO"] < loop_mb["TDPO-2"], loop_mb
    assert "FPO/SimPO time" in capsys.readouterr().out
    bench_md = (tmp_path / "bench.md").read_text()  # the table docs/cost.md quotes
    table_rows = [line.split(" | ")[0][2:] for line in bench_md.splitlines()
                  if line.startswith("| ") and "median" not in line]
    assert table_rows == list(rows)


# ---- --sweep, then --compare at its picks -------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_run_stops_at_its_first_point_below_the_floor(tiny_run, tmp_path, monkeypatch):
    """sweep_run stops training at the first judged point below the validity floor: its last
    point and its saved policy are that step's; a rerun reads it back; a run saved whole is read
    as if it had stopped. The tiny reference has no valid text to lose, so the floor here is a
    stand-in: step 2 and on."""
    reference = tiny_reference(tiny_run, tmp_path)
    argv = tiny_run[1] + QUICK_JUDGE + ["--out_dir", str(reference), "--pref_steps", "3"]
    cfg = config.parse_args(argv)  # judged every step, to step 6
    monkeypatch.setattr(sweep, "fell_below_floor", lambda point, reference: point["step"] >= 2)
    stopped = sweep.sweep_run(cfg, CPU, {}, "FPO", {"method": "fpo", "pref_lr": 1e-3})
    assert [point["step"] for point in stopped["points"]] == [1, 2]
    tag = stopped["tag"]
    assert len((reference / f"{tag}_log.jsonl").read_text().splitlines()) == 2
    evaluated = train.evaluate_policy(cfg, CPU, cfg.run.seed, tag)  # the policy at step 2
    assert stopped["points"][-1]["judge_score"] == evaluated["policy"]["judge_score"]
    monkeypatch.setattr(sweep, "fell_below_floor", lambda point, reference: False)
    whole = sweep.sweep_run(cfg, CPU, {}, "FPO", {"method": "fpo", "pref_lr": 2e-3})
    assert [point["step"] for point in whole["points"]] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(train, "preference_models", fail_if_called("a saved run was trained"))
    assert sweep.sweep_run(cfg, CPU, {}, "FPO", {"method": "fpo", "pref_lr": 1e-3}) == stopped
    monkeypatch.setattr(sweep, "fell_below_floor", lambda point, reference: point["step"] >= 3)
    read_back = sweep.sweep_run(cfg, CPU, {}, "FPO", {"method": "fpo", "pref_lr": 2e-3})
    assert read_back["points"] == whole["points"][:3]


@pytest.mark.slow
def test_sweep_picks_each_method_over_its_references_resumes_and_feeds_compare(
    tiny_run, tmp_path, monkeypatch
):
    _, argv = tiny_run
    out_dir = tmp_path
    tiny_reference(tiny_run, out_dir)  # --compare's first reference; the sweep pretrains its own
    # A smaller grid, the same code: 2 learning rates x 1 knob setting per method, 2 references.
    knobs = {label: ((1e-3, 3e-3), all_knobs[:1])
             for label, (_, all_knobs) in sweep.SWEEP_GRIDS.items()}
    monkeypatch.setattr(sweep, "SWEEP_GRIDS", knobs)
    argv = argv + QUICK_JUDGE
    sweep_argv = argv + ["--out_dir", str(out_dir), "--pref_steps", "6", "--pref_lr", "1e-3",
                         "--sweep_references", "2", "--threads", "1"]
    saved = record_figures(monkeypatch)
    main(sweep_argv + ["--sweep", "--workers", "2"])
    # Each reference is a whole pipeline of its own seed, made once and kept.
    references = [out_dir / "ref_seed1000", out_dir / "ref_seed1001"]
    gpts = [torch.load(reference / "gpt.pt", weights_only=True) for reference in references]
    assert [gpt["config"]["seed"] for gpt in gpts] == [1000, 1001]
    assert not torch.equal(*(next(iter(gpt["state_dict"].values())) for gpt in gpts))
    picks = read(out_dir / "sweep_picks.json")["picks"]
    assert set(picks) == set(knobs) | {"FPO at TDPO-2's KL"}
    for label, pick in picks.items():
        assert set(pick["validation"]) == {"1000", "1001"}
        assert pick["settings"]["pref_lr"] in (1e-3, 3e-3)
        for reference in references:
            run = read(reference / f"{pick['run']}_results.json")
            assert run["label"] == label.replace(" at TDPO-2's KL", "")
            assert pick["validation"][reference.name.removeprefix("ref_seed")] in run["points"]
    # Every third of --pref_steps, to twice it, or to the first point below the validity floor
    # (test_a_sweep_run_stops_...: these tiny references have no valid text to lose).
    for path in out_dir.glob("ref_seed*/sweep_*_results.json"):
        run = read(path)
        steps = [point["step"] for point in run["points"]]
        assert steps == [2, 4, 6, 8, 10, 12][:len(steps)]
        below = [sweep.fell_below_floor(point, run["reference"]) for point in run["points"]]
        assert not any(below[:-1]) and (below[-1] or len(steps) == 6), path.name
    assert not list(out_dir.glob("ref_seed*/sweep_*_step*.pt"))  # nothing saved along the way
    # A point is what train.evaluate_policy reports for the policy there: the last is the
    # saved policy.
    fpo_run = picks["FPO"]["run"]
    ref_cfg = config.parse_args(argv + ["--out_dir", str(references[0]), "--seed", "1000",
                                        "--eval_split", "validation"])
    evaluated = train.evaluate_policy(ref_cfg, CPU, 1000, fpo_run)
    last = read(references[0] / f"{fpo_run}_results.json")["points"][-1]
    for key, path in sweep.POINT_KEYS.items():
        assert last[key] == report.nested(evaluated, path), key
    # Each picture draws sweep_points.md: every method, the mean and range of its references.
    points = (out_dir / "sweep_points.md").read_text()
    picked = helpers.table_rows(points, "method | steps")
    for name, column in (("validity", "valid"), ("win_rate", "win rate")):
        shown = drawn(saved[f"{name}.svg"])
        assert [label for _, label in shown] == list(knobs), name
        for (_, label), series in shown.items():
            cells = [picked[f"{label} | {step}"][column] for step in series["x"]]
            assert_points(series | {"y_bars": series["band"]}, cells)
        assert_one_colour_per_series(saved[f"{name}.svg"])
    shown = drawn(saved["frontier.svg"])
    assert [label for _, label in shown] == list(knobs)
    grid = helpers.table_rows(points, "method | setting | steps")
    for label in knobs:
        cells = [cell for key, cell in grid.items() if key.startswith(f"{label} | ")]
        assert_points(shown[0, label], [cell["judge score"] for cell in cells])
    sweep_md = (out_dir / "sweep.md").read_text()
    table = sweep_md.split("| method | settings tried | picked setting |")[1]
    table = table.split("\n\n")[0].splitlines()[2:]
    assert [row.split(" | ")[0] for row in table] == [f"| {label}" for label in picks]
    assert [row.split(" | ")[1] for row in table] == ["2"] * len(picks)  # settings tried
    assert "the highest worst-case judge score" in sweep_md
    # A rerun trains nothing: every reference and every run's results are on disk (in this
    # process, --workers 1, where the guards below hold).
    monkeypatch.setattr(train, "pretrain", fail_if_called("a reference was pretrained again"))
    monkeypatch.setattr(train, "preference_models",
                        fail_if_called("a finished sweep run was trained again"))
    main(sweep_argv + ["--sweep"])
    assert (out_dir / "sweep.md").read_text() == sweep_md
    # ... but other training or judging settings make every saved run stale.
    for changed in (["--pref_steps", "3"], ["--pref_batch_size", "4"], ["--max_new_tokens", "7"]):
        with pytest.raises(pytest.fail.Exception, match="trained again"):
            main(sweep_argv + changed + ["--sweep"])
    monkeypatch.undo()
    # --compare runs the picks on its own reference (seed 1337, ready made; more than one:
    # test_workers_side_by_side_...), from out_dir's picks file or from the one --picks names.
    picks_file = tmp_path / "kept" / "sweep_picks.json"
    picks_file.parent.mkdir()
    (out_dir / "sweep_picks.json").rename(picks_file)
    main(sweep_argv + ["--compare", "--seeds", "1", "--picks", str(picks_file), "--workers", "2"])
    compared = read(out_dir / "compare.json")
    settings = compared["settings"]
    assert settings["FPO"] == picks["FPO"]["settings"]
    assert settings["FPO (alpha=0) at FPO's pick"]["alpha"] == 0.0
    assert settings["FPO (alpha=0)"] == picks["FPO (alpha=0)"]["settings"]  # its own pick
    assert settings["DPO (offline cache)"] == picks["DPO"]["settings"] | {"method": "dpo_offline"}
    assert {row["seed"] for row in compared["rows"]} == {1337}
    compare_md = (out_dir / "compare.md").read_text()
    assert "| method | seed 1337 |" in compare_md
    assert "| win rate difference | mean | 95% interval |" in compare_md
    # FPO's second pick, nearest TDPO-2's in KL, is a row of its own, paired with TDPO-2.
    assert settings["FPO at TDPO-2's KL"]["method"] == "fpo"
    assert "| FPO at TDPO-2's KL - TDPO-2 |" in compare_md and "| FPO - TDPO-2 |" in compare_md


# ---- --ablation and --control -----------------------------------------------------------------


def test_the_ablation_s_alphas_sit_around_the_default_and_hold_it():
    around_default = [DEFAULTS.alpha * factor for factor in (1 / 16, 1 / 4, 1, 4, 16)]
    assert paper.ablation_alphas(DEFAULTS) == [0.0, *around_default]
    assert paper.ablation_alphas(config.PreferenceConfig(alpha=256.0)) == [
        0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0
    ]
    tables = paper.ablation_rows(config.Config())
    assert [len(rows) for rows in tables.values()] == [2, 12, 12]  # blocks, alphas, ks
    for rows in tables.values():  # each table holds the default's own row
        assert sum(paper.is_default(config.Config(), changed) for changed in rows.values()) >= 1


@pytest.mark.slow
def test_ablation_has_a_row_per_setting_trains_each_setting_once_and_reruns_nothing(
    tmp_path, monkeypatch
):
    # A 2-block GPT, so one row needs an SAE of its own on the other block.
    argv = TINY + QUICK_JUDGE + ["--out_dir", str(tmp_path), "--n_layer", "2", "--seeds", "1",
                                 "--pref_steps", "6"]
    monkeypatch.setattr(paper, "ABLATION_ALPHA_FACTORS", (0.0, 1.0))  # 0 and the default
    monkeypatch.setattr(paper, "ABLATION_FPO_KS", (16, 32))
    trained = []
    train_preference = train.train_preference

    def counting(cfg, device, seed, tag):
        trained.append(tag)
        return train_preference(cfg, device, seed, tag)

    monkeypatch.setattr(train, "train_preference", counting)
    saved = record_figures(monkeypatch)
    main(argv + ["--ablation"])
    text = (tmp_path / "ablation.md").read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| ")
                  and not line.startswith(("| setting", "| win rate difference"))]
    summary_rows = [line for line in table_rows if " - " not in line.split(" | ")[0]]
    labels = [line.split(" | ")[0][2:] for line in summary_rows]
    a = f"{DEFAULTS.alpha:g}"
    double = f"{2 * DEFAULTS.alpha:g}"
    assert labels == [
        "block 0", "block 1",
        "alpha 0, stop-gradient on", "alpha 0, stop-gradient off",
        f"alpha {a}, stop-gradient on", f"alpha {a}, stop-gradient off",
        f"k 16, alpha {double} (scaled)", f"k 16, alpha {a} (fixed)",
        f"k 32, alpha {a} (scaled)", f"k 32, alpha {a} (fixed)",
    ]
    # The default setting (block 1, the default alpha with the stop-gradient, k 32) is one run,
    # shared by its rows, and alpha 0 is one run: no constraint to stop
    assert len(trained) == len(set(trained)) == 6
    assert (tmp_path / "ref_seed1337" / "sae_block0" / "sae.pt").exists()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in summary_rows}
    default_row = rows["block 1"][1:]
    assert default_row == rows[f"alpha {a}, stop-gradient on"][1:]
    assert default_row == rows[f"k 32, alpha {a} (fixed)"][1:]
    assert rows["block 0"][1:] != default_row
    # Each table's other rows, paired with its default row: win rate differences with intervals.
    differences = [line.split(" | ")[0][2:] for line in table_rows
                   if " - " in line.split(" | ")[0]]
    on = f"alpha {a}, stop-gradient on"
    scaled = f"k 32, alpha {a} (scaled)"
    assert differences == [
        "block 0 - block 1",
        f"alpha 0, stop-gradient on - {on}", f"alpha 0, stop-gradient off - {on}",
        f"alpha {a}, stop-gradient off - {on}",
        f"k 16, alpha {double} (scaled) - {scaled}", f"k 16, alpha {a} (fixed) - {scaled}",
        f"k 32, alpha {a} (fixed) - {scaled}",
    ]
    assert f"| k 32, alpha {a} (fixed) - {scaled} | +0.000 | [+0.000, +0.000] |" in text
    # The picture: win rate and validity against alpha (stop-gradient on and off) and k (alpha
    # scaled and fixed), as the alpha and k tables print them.
    shown = drawn(saved["ablation.svg"])
    assert {label for _, label in shown} == {
        "stop-gradient on", "stop-gradient off", "alpha scaled by 1/k", "alpha fixed"
    }
    alphas = helpers.table_rows(text, "setting", after="### alpha")
    wins = shown[0, "stop-gradient on"]
    assert wins["x"] == [0.0, DEFAULTS.alpha]
    assert helpers.close(wins["y"][1], float(alphas[on]["win rate"]))
    assert_one_colour_per_series(saved["ablation.svg"])
    # A rerun trains nothing and writes the same table.
    monkeypatch.setattr(train, "preference_models", fail_if_called("trained again"))
    monkeypatch.setattr(train, "train_sae_stage", fail_if_called("an SAE trained again"))
    main(argv + ["--ablation"])
    assert (tmp_path / "ablation.md").read_text() == text


def test_comparable_weight_evens_the_set_s_part_of_d_with_the_rest_s():
    terms = torch.tensor([0.1, 0.0, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0])  # parts of D(y) per latent
    assert paper.comparable_weight(terms, [0]) == 4.0  # 4 x 0.1 = 0.4, the other latents' part
    assert paper.comparable_weight(terms, [2, 3]) == 1.0  # 0.4 already outweighs 0.1: at least 1
    # a set that never enters I(y): as heavy as all the others together, (8 - 2) / 2
    assert paper.comparable_weight(terms, [1, 4]) == 3.0
    assert paper.comparable_weight(torch.tensor([1e-9, 1.0, 1.0]), [0]) == 2.0  # at most that


@pytest.mark.slow
def test_control_weighs_each_latent_set_at_0_and_w_and_reruns_nothing(
    tiny_run, tmp_path, monkeypatch
):
    _, argv = tiny_run
    argv = argv + QUICK_JUDGE + ["--out_dir", str(tmp_path), "--seeds", "1", "--pref_steps", "6"]
    tiny_reference(tiny_run, tmp_path)
    saved_figures = record_figures(monkeypatch)
    main(argv + ["--control"])
    text = (tmp_path / "control.md").read_text()
    sets = list(paper.CONTROL_TARGETS)
    labels = [paper.UNIFORM] + [f"{name}, w = {w}" for name in sets for w in ("0", "W")]
    summary = helpers.table_rows(text, "FPO with")
    changes = helpers.table_rows(text, "FPO with", after="| FPO with | targets |")
    assert list(summary) == list(changes) == labels
    assert [changes[label]["targets"] for label in labels[1::2]] == [
        "positive", "positive", "on topic", "none"
    ]
    for label in labels:  # paired intervals against the reference, and against every w_i = 1
        cells = changes[label]
        assert all(re.fullmatch(r"[-+]\d\.\d{3} \[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]", cells[column])
                   for column in ("positive - reference", "on topic - reference")), label
        against_uniform = (cells["positive - uniform"], cells["on topic - uniform"])
        assert (against_uniform == ("-", "-")) == (label == paper.UNIFORM), label
    # Each weighted run trained with w = 0 or W on its set's 8 latents, the rest at 1.
    weights = {read(path)["trained_with"]["fpo_latent_weights"]
               for path in (tmp_path / "ref_seed1337").glob("fpo_*_results.json")}
    assert "" in weights and len(weights) <= 9
    for spec in weights - {""}:
        pairs = [pair.split(":") for pair in spec.split(",")]
        assert len(pairs) == 8 and len({weight for _, weight in pairs}) == 1
        assert float(pairs[0][1]) == 0.0 or float(pairs[0][1]) >= 1.0
    match = re.search(r"- seed 1337: positive latents ([\d,]+) \(W = ([\d.]+)\)", text)
    assert match and len(match[1].split(",")) == 8 and float(match[2]) >= 1.0
    # The picture draws the table's intervals, both rows of panels.
    shown = drawn(saved_figures["control.svg"])
    assert_points(shown[0, "FPO"], [changes[paper.UNIFORM]["positive - reference"]])
    assert_points(shown[3, "w_i = W on the set"],
                  [changes[f"{name}, w = W"]["on topic - uniform"] for name in sets])
    assert_one_colour_per_series(saved_figures["control.svg"])
    monkeypatch.setattr(train, "preference_models", fail_if_called("trained again"))
    main(argv + ["--control"])
    assert (tmp_path / "control.md").read_text() == text
    # --fpo_latent_weights is --control's to set: refused before any work.
    with pytest.raises(config.UsageError, match="--control sets the weights itself"):
        main(argv + ["--control", "--fpo_latent_weights", "3:0"])


def test_head_to_head_reports_fpo_s_win_rate_against_each_method():
    """FPO's responses score above DPO's on every prompt and tie SimPO's: FPO's rate is 1 against
    DPO and 0.5 against SimPO (a tie counts half), at every temperature."""
    scores = {
        (seed, temperature): {"FPO": [0.9, 0.8, 0.7], "DPO": [0.1, 0.2, 0.3],
                              "SimPO": [0.9, 0.8, 0.7]}
        for seed in (1, 2) for temperature in (0.2, 1.0)
    }
    rates = compare.head_to_head_rates(scores, ["DPO", "SimPO"], [1, 2], (0.2, 1.0))
    assert rates == {"DPO": {0.2: (1.0, 1.0, 1.0), 1.0: (1.0, 1.0, 1.0)},
                     "SimPO": {0.2: (0.5, 0.5, 0.5), 1.0: (0.5, 0.5, 0.5)}}


def test_the_ablation_scales_alpha_by_default_k_over_k():
    """D(y) sums over up to 2k latents and divides by k, so a smaller k is weighted up: at the
    default alpha 256 and k 32, k 4 trains at alpha 2048 and k 256 at alpha 32 ("scaled"), or
    256 ("fixed")."""
    cfg = config.Config()
    table = next(rows for name, rows in paper.ablation_rows(cfg).items() if "FPO's k" in name)
    alphas = {label: changed["alpha"] for label, changed in table.items()}
    assert alphas["k 4, alpha 2048 (scaled)"] == 2048.0
    assert alphas["k 256, alpha 32 (scaled)"] == 32.0
    assert alphas["k 256, alpha 256 (fixed)"] == 256.0
