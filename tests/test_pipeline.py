"""The pipeline end to end, at a tiny scale: it runs, learns, reproduces, and compares."""

import dataclasses
import gc
import json
import math
import re
from xml.etree import ElementTree

import pytest
import torch

import config
import data
import experiments
import report
import train
from conftest import TINY, numbers_of, tiny_reference
from model import GPT

CPU = torch.device("cpu")


@pytest.mark.slow
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
    # the run's own picture: one panel (series) per logged quantity, one point per step
    root = ElementTree.parse(out_dir / "policy_training.svg").getroot()
    series = root.findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert [g.get("data-label") for g in series] == list(report.TRAINING_LOG_KEYS)
    for g in series:
        assert len(g.findall("{http://www.w3.org/2000/svg}circle")) == len(log)


@pytest.mark.slow
def test_same_seed_same_numbers_and_a_stage_rerun_alone_reproduces(tiny_run, tmp_path):
    out_dir, argv = tiny_run
    first = numbers_of(json.loads((out_dir / "results.json").read_text()))
    train.main(TINY + ["--out_dir", str(tmp_path)])
    assert numbers_of(json.loads((tmp_path / "results.json").read_text())) == first
    train.main(argv + ["--stage", "eval"])  # reuses the saved policy, cache and reference
    assert numbers_of(json.loads((out_dir / "results.json").read_text())) == first


@pytest.mark.slow
def test_preference_training_holds_no_reference_model(tiny_run, monkeypatch):
    """During FPO training exactly one GPT exists (the policy); DPO's online reference makes two."""
    out_dir, argv = tiny_run
    live_gpts = []
    original_losses = train.preference_losses

    def counting_losses(*args, **kwargs):
        gc.collect()
        live_gpts.append(sum(type(obj) is GPT for obj in gc.get_objects()))
        return original_losses(*args, **kwargs)

    monkeypatch.setattr(train, "preference_losses", counting_losses)
    cfg = train.parse_args(argv + ["--pref_steps", "2"])
    for method, expected in (("fpo", 1), ("dpo", 2)):
        live_gpts.clear()
        cfg.prefer.method = method
        train.train_preference(cfg, CPU, seed=0, tag=f"count_{method}")
        assert live_gpts == [expected, expected], method


@pytest.mark.slow
def test_frozen_sae_and_reference_get_no_gradient(tiny_run):
    _, argv = tiny_run
    cfg = train.parse_args(argv)
    policy, gpt_fingerprint = train.load_gpt(cfg, CPU)
    inputs = train.load_preference_inputs(cfg, policy, gpt_fingerprint, CPU)
    sae = inputs.sae
    reference = train.load_gpt(cfg, CPU)[0].eval().requires_grad_(False)
    frozen_before = [p.clone() for p in [*sae.parameters(), *reference.parameters()]]
    batch = data.pair_batch(inputs.train_pairs, torch.arange(4), 0, data.eos_id(inputs.enc), CPU)
    for method in ("fpo", "tdpo2"):  # the SAE is in FPO's graph, the reference in TDPO's
        policy.zero_grad(set_to_none=True)
        cfg.prefer.method = method
        losses, *_ = train.preference_losses(cfg.prefer, cfg.sae.sae_layer, policy, batch, inputs, reference)
        losses.mean().backward()
        assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in [*sae.parameters(), *reference.parameters()])
    for before, after in zip(frozen_before, [*sae.parameters(), *reference.parameters()]):
        assert torch.equal(before, after)


@pytest.mark.slow
def test_compare_writes_a_finite_row_for_every_method(tiny_run, tmp_path):
    _, argv = tiny_run
    out_dir = tmp_path
    tiny_reference(tiny_run, out_dir)
    experiments.main(argv + ["--out_dir", str(out_dir), "--compare", "--seeds", "1", "--pref_steps", "4"])
    table = (out_dir / "compare.md").read_text()
    rows = json.loads((out_dir / "compare.json").read_text())["rows"]
    assert {row["label"] for row in rows} == set(experiments.COMPARE_ROWS)
    for label in experiments.COMPARE_ROWS:
        assert f"| {label} |" in table
    for row in rows:
        for key in ("win_rate", "reward_accuracy", "implicit_reward_accuracy", "feature_drift", "median_step_ms"):
            assert math.isfinite(row[key]), (row["label"], key)
        for key in ("judge_score", "valid_rate", "kl_from_reference", "entropy_per_token", "distinct_2", "mean_length"):
            assert math.isfinite(row["policy"][key]), (row["label"], key)
    # The offline cache is exact: DPO reading the reference's summed log-probs from it trains the
    # same policy as DPO running the reference online, up to float rounding (the cache ran the
    # reference on batches padded to other lengths), so it samples the very same responses.
    online, offline = (numbers_of(next(row for row in rows if row["label"] == label)) for label in ("DPO", "DPO (offline cache)"))
    for key in ("win_rate", "reward_accuracy", "implicit_reward_accuracy", "policy.valid_rate", "policy.judge_score", "policy.mean_length", "policy.distinct_2"):
        assert online[key] == offline[key], key
    for key in ("feature_drift", "policy.kl_from_reference", "policy.entropy_per_token"):
        assert math.isclose(online[key], offline[key], rel_tol=1e-4), key


@pytest.mark.slow
def test_head_to_head_and_bound_read_the_compare_policies(tiny_run, tmp_path, monkeypatch):
    _, argv = tiny_run
    argv = argv + ["--out_dir", str(tmp_path)]
    tiny_reference(tiny_run, tmp_path)
    rows = {"FPO": experiments.COMPARE_ROWS["FPO"], "SimPO": experiments.COMPARE_ROWS["SimPO"], "DPO": experiments.COMPARE_ROWS["DPO"]}
    monkeypatch.setattr(experiments, "COMPARE_ROWS", rows)
    experiments.main(argv + ["--compare", "--seeds", "1", "--pref_steps", "4"])
    monkeypatch.setattr(train, "train_preference", lambda *args, **kwargs: pytest.fail("head to head trained"))
    experiments.main(argv + ["--head_to_head"])
    table = (tmp_path / "head_to_head.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| FPO against | T = 0.2 | T = 0.4 | T = 0.6 | T = 0.8 | T = 1 | above 0.5 | below 0.5 |"
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| SimPO", "| DPO"] and lines[4] == ""
    for line in lines[2:4]:
        cells = line.split(" | ")[1:6]
        assert all(re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cell) for cell in cells), line
    series = ElementTree.parse(tmp_path / "head_to_head.svg").getroot().findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert [g.get("data-label") for g in series] == ["SimPO", "DPO", "a tie (0.5)"]
    # A rerun samples nothing and writes the same table.
    monkeypatch.setattr(experiments, "sample_responses", lambda *args, **kwargs: pytest.fail("sampled again"))
    experiments.main(argv + ["--head_to_head"])
    assert (tmp_path / "head_to_head.md").read_text() == table
    # The judge's scores are kept per reference and temperature: one per method and test prompt.
    scores = json.loads((tmp_path / "ref_seed1337" / "head_to_head_t1.json").read_text())["scores"]
    assert set(scores) == {"FPO", "SimPO", "DPO"} and len(scores["FPO"]) == 24
    # --bound reads the same policies (and trains FPO once more, along its steps): a row per
    # method, and the D(y)-SeqKL picture.
    monkeypatch.undo()
    experiments.main(argv + ["--bound"])
    bound = (tmp_path / "bound.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in bound[2:5]] == ["| FPO", "| SimPO", "| DPO"] and bound[5] == ""
    assert all(0.0 <= float(line.split(" | ")[1]) <= 1.0 for line in bound[2:5])
    series = ElementTree.parse(tmp_path / "bound.svg").getroot().findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert [g.get("data-label") for g in series] == ["FPO", "SimPO", "DPO", "FPO along training"]
    # ... and FPO trained once more (this command's 30 steps), measured at every fifth of them.
    trajectory = [line.split(" | ")[0] for line in bound if line.startswith("| ") and line[2].isdigit()]
    assert trajectory == ["| 6", "| 12", "| 18", "| 24", "| 30"]
    assert not list((tmp_path / "ref_seed1337").glob("bound_fpo_trajectory_step*.pt"))


@pytest.mark.slow
def test_bench_reports_every_method_and_the_ratios(tiny_run, tmp_path, capsys):
    _, argv = tiny_run
    out_dir = tmp_path
    tiny_reference(tiny_run, out_dir)
    experiments.main(argv + ["--out_dir", str(out_dir), "--bench", "--bench_steps", "3"])
    bench = json.loads((out_dir / "bench.json").read_text())
    assert set(bench["methods"]) == set(experiments.COMPARE_ROWS)
    assert set(bench["ratios"]) == {f"FPO/{other} {measure}" for other in ("SimPO", "DPO", "TDPO-2") for measure in ("time", "loop memory")}
    assert all(value > 0 for value in bench["ratios"].values())
    loop_mb = {label: values["loop_memory_mb"] for label, values in bench["methods"].items()}
    # the online reference's logits and TDPO's full-vocabulary KL are allocated inside the loop; FPO needs neither
    assert loop_mb["FPO"] < loop_mb["DPO"] < loop_mb["TDPO-2"], loop_mb
    assert "FPO/SimPO time" in capsys.readouterr().out
    bench_md = (out_dir / "bench.md").read_text()  # the table docs/cost.md quotes: a row per method
    rows = [line.split(" | ")[0][2:] for line in bench_md.splitlines() if line.startswith("| ") and "median" not in line]
    assert rows == list(experiments.COMPARE_ROWS)


def test_command_line_overrides_are_type_checked():
    cfg = train.parse_args(["--beta", "0.5", "--n_layer", "2", "--resume", "--skip-bad-rows"])
    assert cfg.prefer.beta == 0.5 and cfg.pretrain.n_layer == 2 and cfg.run.resume is True and cfg.run.skip_bad_rows is True
    assert train.parse_args([]) == train.Config()  # no flags: every default
    with pytest.raises(train.UsageError, match=r"unknown option\(s\) --betta 0.5; `python train.py --help` lists them"):
        train.parse_args(["--betta", "0.5"])
    with pytest.raises(train.UsageError, match="--n_layer: invalid int value: 'two'"):
        train.parse_args(["--n_layer", "two"])
    with pytest.raises(train.UsageError, match=r"--method: invalid choice: 'ppo' \(choose from 'fpo', 'fpo_kl', 'dpo'"):
        train.parse_args(["--method", "ppo"])


def test_every_config_field_has_help_text_in_the_argparse_help(capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse_args(["--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for section in dataclasses.fields(config.Config):
        helps = config.field_help(section.type)
        assert set(helps) == {f.name for f in dataclasses.fields(section.type)}, section.name
        for name, text in helps.items():
            assert f"--{name}" in shown and " ".join(text.split()) in shown, name


@pytest.mark.slow
def test_sweep_picks_each_method_over_its_references_resumes_and_feeds_compare(tiny_run, tmp_path, monkeypatch):
    _, argv = tiny_run
    out_dir = tmp_path
    tiny_reference(tiny_run, out_dir)  # --compare's first reference; the sweep pretrains its own
    # A smaller grid, the same code: 2 learning rates x 1 knob setting per method, 2 references.
    monkeypatch.setattr(experiments, "SWEEP_LRS", (1e-3, 3e-3))
    monkeypatch.setattr(experiments, "SWEEP_KNOBS", {label: knobs[:1] for label, knobs in experiments.SWEEP_KNOBS.items()})
    # ... and one setting past FPO's grid, which the sweep trains and picks among like the rest.
    extension = {"method": "fpo", "beta": 8.0, "alpha": 64.0, "pref_lr": 2e-3}
    monkeypatch.setattr(experiments, "SWEEP_EXTENSIONS", {"FPO": [extension]})
    sweep_argv = argv + ["--out_dir", str(out_dir), "--pref_steps", "6", "--pref_lr", "1e-3", "--sweep_references", "2"]
    experiments.main(sweep_argv + ["--sweep"])
    # Each reference is a whole pipeline of its own seed, made once and kept.
    references = [out_dir / "ref_seed1000", out_dir / "ref_seed1001"]
    gpts = [torch.load(reference / "gpt.pt", weights_only=True) for reference in references]
    assert [gpt["config"]["seed"] for gpt in gpts] == [1000, 1001]
    assert not torch.equal(*(next(iter(gpt["state_dict"].values())) for gpt in gpts))
    picks = json.loads((out_dir / "sweep_picks.json").read_text())["picks"]
    assert set(picks) == set(experiments.SWEEP_KNOBS) | {"FPO at TDPO-2's KL"}
    for label, pick in picks.items():
        assert set(pick["validation"]) == {"1000", "1001"} and pick["settings"]["pref_lr"] in (1e-3, 3e-3)
        for reference in references:
            run = json.loads((reference / f"{pick['run']}_results.json").read_text())
            assert [point["step"] for point in run["points"]] == [2, 4, 6, 8, 10, 12]  # every third of --pref_steps, to twice it
            assert run["label"] == label.replace(" at TDPO-2's KL", "") and pick["validation"][reference.name.removeprefix("ref_seed")] in run["points"]
    for reference in references:
        assert (reference / f"{experiments.sweep_tag(extension)}_results.json").exists()
    assert not list(out_dir.glob("ref_seed*/sweep_*_step*.pt"))  # snapshots are deleted once judged
    for name in ("frontier", "validity", "win_rate"):
        series = ElementTree.parse(out_dir / f"{name}.svg").getroot().findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
        assert [g.get("data-label") for g in series] == list(experiments.SWEEP_KNOBS), name
    sweep_md = (out_dir / "sweep.md").read_text()
    table = sweep_md.split("| method | settings tried | picked setting |")[1].split("\n\n")[0].splitlines()[2:]
    assert [row.split(" | ")[0] for row in table] == [f"| {label}" for label in picks]
    # FPO's grid (and its matched-KL pick's) holds the extension: 2 learning rates + 1.
    extended = {"FPO", "FPO at TDPO-2's KL"}
    assert [row.split(" | ")[1] for row in table] == ["3" if label in extended else "2" for label in picks]
    assert "the highest worst-case judge score" in sweep_md
    # A rerun trains nothing: every reference and every run's results are on disk.
    monkeypatch.setattr(train, "pretrain", lambda *args, **kwargs: pytest.fail("a reference was pretrained again"))
    monkeypatch.setattr(train, "train_preference", lambda *args, **kwargs: pytest.fail("a finished sweep run was trained again"))
    experiments.main(sweep_argv + ["--sweep"])
    # ... but other training or judging settings make every saved run stale: its first run trains again.
    for changed in (["--pref_steps", "3"], ["--pref_batch_size", "4"], ["--max_new_tokens", "7"]):
        with pytest.raises(pytest.fail.Exception, match="trained again"):
            experiments.main(sweep_argv + changed + ["--sweep"])
    monkeypatch.undo()
    # --compare runs the picks on its own references (seed 1337 ready made, 1338 pretrained here),
    # from out_dir's picks file or from the one --picks names.
    picks_file = tmp_path / "kept" / "sweep_picks.json"
    picks_file.parent.mkdir()
    (out_dir / "sweep_picks.json").rename(picks_file)
    experiments.main(sweep_argv + ["--compare", "--seeds", "2", "--picks", str(picks_file)])
    compare = json.loads((out_dir / "compare.json").read_text())
    assert compare["settings"]["FPO"] == picks["FPO"]["settings"] and compare["settings"]["FPO (alpha=0) at FPO's pick"]["alpha"] == 0.0
    assert compare["settings"]["FPO (alpha=0)"] == picks["FPO (alpha=0)"]["settings"]  # its own pick
    assert compare["settings"]["DPO (offline cache)"] == picks["DPO"]["settings"] | {"method": "dpo_offline"}
    assert sorted({row["seed"] for row in compare["rows"]}) == [1337, 1338]
    compare_md = (out_dir / "compare.md").read_text()
    assert "| method | seed 1337 | seed 1338 |" in compare_md
    assert "| win rate difference | mean | 95% interval |" in compare_md
    # FPO's second pick, nearest TDPO-2's in KL, is a row of its own, paired with TDPO-2.
    assert compare["settings"]["FPO at TDPO-2's KL"]["method"] == "fpo"
    assert "| FPO at TDPO-2's KL - TDPO-2 |" in compare_md and "| FPO - TDPO-2 |" in compare_md


@pytest.mark.slow
def test_ablation_has_a_row_per_setting_trains_each_setting_once_and_reruns_nothing(tmp_path, monkeypatch):
    # A 2-block GPT, so one row needs an SAE of its own on the other block.
    argv = TINY + ["--out_dir", str(tmp_path), "--n_layer", "2", "--seeds", "1", "--pref_steps", "6"]
    monkeypatch.setattr(experiments, "ABLATION_ALPHAS", (0.0, 16.0))
    monkeypatch.setattr(experiments, "ABLATION_FPO_KS", (16, 32))
    trained = []
    train_preference = train.train_preference
    monkeypatch.setattr(train, "train_preference", lambda cfg, device, seed, tag, **kw: trained.append(tag) or train_preference(cfg, device, seed, tag, **kw))
    experiments.main(argv + ["--ablation"])
    text = (tmp_path / "ablation.md").read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| setting", "| win rate difference"))]
    summary_rows = [line for line in table_rows if " - " not in line.split(" | ")[0]]
    labels = [line.split(" | ")[0][2:] for line in summary_rows]
    assert labels == [
        "block 0", "block 1",
        "alpha 0, stop-gradient on", "alpha 0, stop-gradient off", "alpha 16, stop-gradient on", "alpha 16, stop-gradient off",
        "k 16, alpha 32 (scaled)", "k 16, alpha 16 (fixed)", "k 32, alpha 16 (scaled)", "k 32, alpha 16 (fixed)",
    ]
    # The default setting (block 1, alpha 16 with the stop-gradient, k 32) is one run, shared by its rows,
    assert len(trained) == len(set(trained)) == 6  # and alpha 0 is one run: no constraint to stop
    assert (tmp_path / "ref_seed1337" / "sae_block0" / "sae.pt").exists()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in summary_rows}
    assert rows["block 1"][1:] == rows["alpha 16, stop-gradient on"][1:] == rows["k 32, alpha 16 (fixed)"][1:]
    assert rows["block 0"][1:] != rows["block 1"][1:]
    # Each table's other rows, paired with its default row: win rate differences with intervals.
    differences = [line.split(" | ")[0][2:] for line in table_rows if " - " in line.split(" | ")[0]]
    assert differences == [
        "block 0 - block 1",
        "alpha 0, stop-gradient on - alpha 16, stop-gradient on", "alpha 0, stop-gradient off - alpha 16, stop-gradient on",
        "alpha 16, stop-gradient off - alpha 16, stop-gradient on",
        "k 16, alpha 32 (scaled) - k 32, alpha 16 (scaled)", "k 16, alpha 16 (fixed) - k 32, alpha 16 (scaled)", "k 32, alpha 16 (fixed) - k 32, alpha 16 (scaled)",
    ]
    assert "| k 32, alpha 16 (fixed) - k 32, alpha 16 (scaled) | +0.000 | [+0.000, +0.000] |" in text
    series = ElementTree.parse(tmp_path / "ablation.svg").getroot().findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert len(series) == 4
    # A rerun trains nothing and writes the same table.
    monkeypatch.setattr(train, "train_preference", lambda *args, **kwargs: pytest.fail("trained again"))
    monkeypatch.setattr(train, "train_sae_stage", lambda *args, **kwargs: pytest.fail("an SAE trained again"))
    experiments.main(argv + ["--ablation"])
    assert (tmp_path / "ablation.md").read_text() == text


@pytest.mark.slow
def test_control_constrains_each_latent_set_and_reruns_nothing(tiny_run, tmp_path, monkeypatch):
    _, argv = tiny_run
    argv = argv + ["--out_dir", str(tmp_path), "--seeds", "1", "--pref_steps", "6"]
    tiny_reference(tiny_run, tmp_path)
    experiments.main(argv + ["--control"])
    text = (tmp_path / "control.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| D(y) over", "| win rate difference"))]
    assert [row[0][2:] for row in rows] == [
        "all latents", "sentiment latents", "topic latents", "random latents",
        "sentiment latents - all latents", "topic latents - all latents", "random latents - all latents",
        "sentiment latents - random latents", "topic latents - random latents",
    ]
    # Each run trained D(y) over its set: 8 latents each, all of them for the first.
    saved = {json.loads(path.read_text())["trained_with"]["fpo_latents"] for path in (tmp_path / "ref_seed1337").glob("fpo_*_results.json")}
    assert "" in saved and len(saved) == 4 and all(len(latents.split(",")) == 8 for latents in saved - {""})
    assert "- seed 1337: all latents all; sentiment latents " in text
    series = ElementTree.parse(tmp_path / "control.svg").getroot().findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert [g.get("data-label") for g in series] == ["all latents", "sentiment latents", "topic latents", "random latents"]
    monkeypatch.setattr(train, "train_preference", lambda *args, **kwargs: pytest.fail("trained again"))
    experiments.main(argv + ["--control"])
    assert (tmp_path / "control.md").read_text() == text
