"""The paper's other experiments, on --compare's references (seeds --seed, --seed + 1, ...):

    --ablation  FPO at config.py's defaults with one thing changed: the SAE's block, alpha with
                and without the stop-gradient, or k (the paper's Table 3): ablation.md and .svg
    --control   FPO with per-latent weights w_i in D(y), 0 or W on the sentiment, the topic or
                random latents, the constraint kept on the rest (its Sec. 5.3 and Table 4 set
                a per-feature beta): control.md and control.svg
    --bound     per-token KL against the change of the SAE codes (its Appendix B), and D(y)
                against SeqKL(y) (its Fig. 4-right), on --compare's policies: bound.md, bound.svg
"""

import dataclasses
import hashlib
import shutil
import statistics
import time
from pathlib import Path

import torch

import data
import train
from config import Config, PreferenceConfig, settings_section, stage_settings
from experiments import figures, report
from experiments.common import (
    COMPARE_RESUME, compare_settings, compare_tag, frozen_reference, inputs_made_from, make_once,
    RERUN, read_compare, reference_run, references_and_runs, row_differences, run_all,
    saved_run, train_policy, with_method, write_outputs,
)
from experiments.settings import LabConfig, compare_seeds
from experiments.stats import (
    attribute_latents, bootstrap_mean, bootstrap_spearman, bound_constant, bound_terms,
    feature_mse_terms, paired_difference,
)
from loading import load_policy
from runtime import autocast, write_atomically, write_json

# ----------------------------------------------------------------------------------------------
# --ablation: FPO at the default setting with one thing changed (the paper's Table 3, and k)

# alpha as multiples of the default's (config.py's 256: 0, 16, 64, 256, 1024, 4096), so the
# default sits in the middle of the non-zero values whatever --alpha is; k from 4 to 256, with
# the default's k among them
ABLATION_ALPHA_FACTORS = (0.0, 1 / 16, 1 / 4, 1.0, 4.0, 16.0)
ABLATION_FPO_KS = (4, 8, 16, 32, 64, 256)
ABLATION_COLUMNS = {  # column: (results key path, digits); the paper's three first
    "reward acc (train)": (("train_reward_accuracy",), 3),
    "reward acc (held-out)": (("reward_accuracy",), 3),
    "entropy": (("policy", "entropy_per_token"), 3),
    "win rate": (("win_rate",), 3),
    "valid": (("policy", "valid_rate"), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
    "length": (("policy", "mean_length"), 1),
}


def ablation_alphas(pref_cfg: PreferenceConfig) -> list[float]:
    """The alphas of the ablation: ABLATION_ALPHA_FACTORS times the default's; 256 -> [0.0, 16.0,
    64.0, 256.0, 1024.0, 4096.0]."""
    return list(dict.fromkeys(factor * pref_cfg.alpha for factor in ABLATION_ALPHA_FACTORS))


def ablation_rows(cfg: Config) -> dict[str, dict[str, dict]]:
    """{table: {row label: the settings it changes}}: the SAE on every block; alpha with and
    without the stop-gradient on D(y_w); FPO's k with alpha scaled by default k / k (D(y) is a
    mean over the union of top-k sets, so the constraint's weight moves with k) and fixed."""
    pref_cfg = cfg.prefer
    ks = sorted({*ABLATION_FPO_KS, pref_cfg.fpo_k})
    return {
        "The SAE's block": {
            f"block {block}": {"sae_layer": block} for block in range(cfg.pretrain.n_layer)
        },
        "alpha, with and without the stop-gradient on D(y_w)": {
            f"alpha {alpha:g}, stop-gradient {'on' if stop else 'off'}": {
                "alpha": alpha, "fpo_stop_grad": stop
            }
            for alpha in ablation_alphas(pref_cfg)
            for stop in (True, False)
        },
        f"FPO's k, alpha scaled by {pref_cfg.fpo_k}/k or fixed at {pref_cfg.alpha:g}": {
            f"k {k}, alpha {alpha:g} ({scaled})": {"fpo_k": k, "alpha": alpha}
            for k in ks
            for scaled, alpha in (
                ("scaled", pref_cfg.alpha * pref_cfg.fpo_k / k), ("fixed", pref_cfg.alpha)
            )
        },
    }


def ablation(cfg: LabConfig, device) -> None:
    """FPO at the default settings with one of them changed, per row of ablation_rows, on the
    references of --seeds (--compare's: their GPTs and SAEs are shared), judged on the test
    prompts. Rows with the same settings are trained once; a finished run made from the same
    inputs is read back. Writes ablation.md (mean ± std over the references) and ablation.svg."""
    out = Path(cfg.run.out_dir)
    tables = ablation_rows(cfg)
    seeds = compare_seeds(cfg)
    n_rows = sum(map(len, tables.values()))
    print(f"\n== ablation: {n_rows} rows of FPO on {len(seeds)} references "
          f"(seeds {seeds[0]}-{seeds[-1]}) ==")
    started = time.time()
    run_tags = {}  # seed: the run tag of each task runs_of gave, in order
    def runs_of(ref_cfg: Config, _) -> list[tuple]:
        tasks = {}  # run tag: task; rows with the same settings (the default, in every table)
        for table, changes in tables.items():  # are one run
            for label, changed in changes.items():
                tasks.setdefault(variant_tag(ref_cfg, changed), (
                    f"{label} on reference {ref_cfg.run.seed}", fpo_variant, ref_cfg, device,
                    changed))
        run_tags[ref_cfg.run.seed] = list(tasks)
        return list(tasks.values())

    references = []  # ref_cfg of each seed
    runs = {}  # (seed, run tag): results
    for (ref_cfg, _), results in references_and_runs(cfg, seeds, device, runs_of):
        references.append(ref_cfg)
        seed = ref_cfg.run.seed
        runs |= {(seed, tag): run for tag, run in zip(run_tags[seed], results)}
    rows = {
        table: [runs[ref_cfg.run.seed, variant_tag(ref_cfg, changed)] | {"label": label}
                for ref_cfg in references
                for label, changed in changes.items()]
        for table, changes in tables.items()
    }
    pref_cfg = cfg.prefer
    sections = [
        f"Every row is FPO at beta {pref_cfg.beta:g}, alpha {pref_cfg.alpha:g}, k "
        f"{pref_cfg.fpo_k}, pref_lr {pref_cfg.pref_lr:g}, {pref_cfg.pref_steps} steps, the SAE on "
        f"block {cfg.sae.sae_layer % cfg.pretrain.n_layer} and the stop-gradient on, but for "
        "what the row names. Test prompts.\n"
    ]
    n_prompts = len(rows[next(iter(tables))][0]["prompt_wins"])
    for table, changes in tables.items():
        default = next(label for label, changed in changes.items() if is_default(cfg, changed))
        pairs = [(label, default) for label in changes if label != default]
        summary = report.compare_table(
            rows[table], list(changes), ABLATION_COLUMNS, seeds, {}, "setting"
        )
        differences = report.difference_table(
            row_differences(rows[table], pairs), len(seeds), n_prompts
        )
        sections.append(f"### {table}\n\n{summary}\n{differences}")
    figure = figures.ablation(ablation_panels(rows, tables), list(ABLATION_FIGURE), len(seeds))
    write_outputs(out, "ablation", "\n".join(sections), figure, started)


def is_default(cfg: Config, changed: dict) -> bool:
    """Whether an ablation row's changed settings are all the defaults: the row the others are
    compared with."""
    defaults = dataclasses.asdict(cfg.prefer) | {
        "sae_layer": cfg.sae.sae_layer % cfg.pretrain.n_layer
    }
    return all(defaults[key] == value for key, value in changed.items())


def fpo_variant(ref_cfg: Config, device, changed: dict) -> dict:
    """FPO trained and judged on one reference with `changed` settings (the SAE's block, or any
    of the preference settings): evaluate_policy's results and the reward accuracy on training
    pairs; read back when a run of the same settings from the same inputs finished."""
    print(f"FPO with {changed or 'the defaults'} on reference {ref_cfg.run.seed}", flush=True)
    run_cfg, tag = variant_run(ref_cfg, device, changed)
    path = Path(run_cfg.run.out_dir) / f"{tag}_results.json"
    made_from = inputs_made_from(run_cfg, device) | {
        "eval": dataclasses.asdict(run_cfg.eval),
        "settings": stage_settings(run_cfg, "prefer"),
    }
    saved = saved_run(path, made_from, needs=("feature_mse",))
    if saved is not None:
        return saved
    seed = run_cfg.run.seed
    train.train_preference(run_cfg, device, seed, tag)
    results = train.evaluate_policy(run_cfg, device, seed, tag)
    results["train_reward_accuracy"] = training_accuracy(run_cfg, device, tag)
    results["made_from"] = made_from
    write_json(path, results)
    return results


def variant_run(ref_cfg: Config, device, changed: dict) -> tuple[Config, str]:
    """The config and the tag (out_dir/<tag>.pt) of FPO with `changed` settings on one
    reference. A change of the SAE's block trains an SAE (and its cache) on that block, in its
    own directory beside the reference's."""
    run_cfg = with_method(ref_cfg, variant_settings(changed))
    block = variant_block(ref_cfg, changed)
    if block != variant_block(ref_cfg, {}):
        run_cfg = sae_on_block(run_cfg, block, device)
    return run_cfg, variant_tag(ref_cfg, changed)


def variant_settings(changed: dict) -> dict:
    """The preference settings of FPO with `changed` settings (the SAE's block aside)."""
    pref_changes = {key: value for key, value in changed.items() if key != "sae_layer"}
    if pref_changes.get("alpha") == 0.0:  # no constraint: the stop-gradient changes nothing
        pref_changes["fpo_stop_grad"] = True
    return {"method": "fpo"} | pref_changes


def variant_block(ref_cfg: Config, changed: dict) -> int:
    """The block (0..n_layer-1) whose SAE FPO with `changed` settings reads."""
    return changed.get("sae_layer", ref_cfg.sae.sae_layer) % ref_cfg.pretrain.n_layer


def variant_tag(ref_cfg: Config, changed: dict) -> str:
    """The file name of FPO's run with `changed` settings: one per distinct run."""
    pref_cfg = with_method(ref_cfg, variant_settings(changed)).prefer
    tag = (f"fpo_block{variant_block(ref_cfg, changed)}_alpha{pref_cfg.alpha:g}_k{pref_cfg.fpo_k}"
           f"_stopgrad{int(pref_cfg.fpo_stop_grad)}")
    if pref_cfg.fpo_latent_weights:
        weights = pref_cfg.fpo_latent_weights.encode()
        tag += "_weights" + hashlib.sha256(weights).hexdigest()[:8]
    return tag


@torch.no_grad()
def training_accuracy(run_cfg: Config, device, tag: str) -> float:
    """The reward accuracy of out_dir/<tag>.pt, with its own reward, on the first training pairs,
    as many as there are held-out ones (cache rows from 0): the paper's Table 3 puts it beside
    the held-out one of train.held_out_accuracy."""
    reference, inputs = frozen_reference(run_cfg, device)
    policy, trained_with = load_policy(run_cfg, tag, reference, inputs.made_from, device)
    trained_cfg = settings_section(PreferenceConfig, trained_with)
    pairs = inputs.train_pairs[: len(inputs.test_pairs)]
    eos = data.eos_id(inputs.enc)
    correct = []
    for batch in data.every_pair(pairs, 64, 0, eos, device):
        with autocast(device):
            result = train.preference_losses(
                trained_cfg, run_cfg.sae.sae_layer, policy, batch, inputs, reference
            )
        correct.append((result.chosen_rewards > result.rejected_rewards).float())
    return torch.cat(correct).mean().item()


def sae_on_block(ref_cfg: Config, block: int, device) -> Config:
    """ref_cfg in the reference's sae_block<block>/ directory: the reference GPT (copied there)
    with an SAE trained on that block's output, made once."""
    block_dir = Path(ref_cfg.run.out_dir) / f"sae_block{block}"
    block_dir.mkdir(exist_ok=True)
    block_cfg = dataclasses.replace(
        ref_cfg,
        run=dataclasses.replace(ref_cfg.run, out_dir=str(block_dir)),
        sae=dataclasses.replace(ref_cfg.sae, sae_layer=block),
    )
    if not (block_dir / "gpt.pt").exists():
        write_atomically(block_dir / "gpt.pt",
                         lambda tmp: shutil.copyfile(Path(ref_cfg.run.out_dir) / "gpt.pt", tmp))
    make_once(block_cfg, "sae", device)
    return block_cfg


ABLATION_FIGURE = ("win rate", "valid")  # the columns of ABLATION_COLUMNS that ablation.svg draws


def ablation_panels(rows: dict, tables: dict) -> dict[str, dict[str, list]]:
    """What ablation.svg draws, from the rows of the alpha and the k tables: {"alpha": {"stop-
    gradient on": [(alpha, {column: (mean, std)}), ...], "stop-gradient off": ...}, "k":
    {"alpha scaled by 1/k": [(k, ...)], "alpha fixed": ...}}, the mean ± std over the
    references that the tables print."""
    def numbers(table: str, label: str) -> dict[str, tuple[float, float]]:
        cells = {}
        for column in ABLATION_FIGURE:
            path, _ = ABLATION_COLUMNS[column]
            values = [report.nested(row, path) for row in rows[table] if row["label"] == label]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells[column] = (statistics.mean(values), spread)
        return cells

    alpha_table = next(name for name in tables if name.startswith("alpha"))
    k_table = next(name for name in tables if name.startswith("FPO's k"))
    alpha_series = {f"stop-gradient {stop}": [] for stop in ("on", "off")}
    for label, changed in tables[alpha_table].items():
        alpha_series[label.split(", ")[1]].append((changed["alpha"], numbers(alpha_table, label)))
    k_series = {"alpha scaled by 1/k": [], "alpha fixed": []}
    for label, changed in tables[k_table].items():
        series = "alpha scaled by 1/k" if label.endswith("(scaled)") else "alpha fixed"
        k_series[series].append((changed["fpo_k"], numbers(k_table, label)))
    return {"alpha": alpha_series, "k": k_series}


# ----------------------------------------------------------------------------------------------
# --control: per-latent weights w_i in D(y) on chosen sets of latents (the paper's Sec. 5.3 and
# Table 4 set a per-feature beta on chosen features), the constraint kept on every other latent

CONTROL_LATENTS = 8  # latents per chosen set
CONTROL_TARGETS = {  # set: the judge's attribute its latents were chosen for
    "positive latents": "positive",
    "negative latents": "positive",
    "topic latents": "on topic",
    "random latents": "none",
}
UNIFORM = "FPO, every w_i = 1"
CONTROL_COLUMNS = {  # column: (results key path, digits)
    "positive": (("policy", "positive_rate"), 3),
    "on topic": (("policy", "on_topic_rate"), 3),
    "win rate": (("win_rate",), 3),
    "valid": (("policy", "valid_rate"), 3),
    "KL from ref": (("policy", "kl_from_reference"), 2),
}
ATTRIBUTES = {"positive": "positive", "on topic": "on_topic"}  # column: per-prompt results key


def control(cfg: LabConfig, device) -> None:
    """FPO at the default settings, its constraint on every latent, with the weights w_i of
    D(y) changed on one set of latents per run, on the references of --seeds: the
    CONTROL_LATENTS latents that most raise (positive) or lower (negative) their activation on
    positive words, those that most separate the topics (stats.attribute_latents, found on each
    reference's held-out pairs), and as many at random; each at w = 0 and at w = W (see
    comparable_weight). Each row's positive and on-topic rates, against the reference's and
    against FPO with every w_i = 1 on the same prompts, with paired bootstrap intervals. Writes
    control.md and control.svg."""
    out = Path(cfg.run.out_dir)
    seeds = compare_seeds(cfg)
    print(f"\n== control: FPO with weights on chosen latents, on {len(seeds)} references ==")
    chosen = {}  # seed: {set: (latents, W)}
    started = time.time()
    def uniform_of(ref_cfg: Config, _) -> list[tuple]:
        return [(f"{UNIFORM} on reference {ref_cfg.run.seed}", fpo_variant, ref_cfg, device, {})]

    references = references_and_runs(cfg, seeds, device, uniform_of)
    rows = [results | {"label": UNIFORM} for _, (results,) in references]
    tasks, task_labels = [], []
    for seed, ((ref_cfg, _), _) in zip(seeds, references):
        terms = uniform_feature_mse_terms(ref_cfg, device)
        chosen[seed] = {
            name: (latents, comparable_weight(terms, latents))
            for name, latents in latent_sets(ref_cfg, device).items()
        }
        for name, (latents, heavy) in chosen[seed].items():
            for weight_label, weight in (("0", 0.0), ("W", heavy)):
                task_labels.append(f"{name}, w = {weight_label}")
                weights = ",".join(f"{latent}:{weight:.3f}" for latent in latents)
                tasks.append((f"{task_labels[-1]} on reference {seed}", fpo_variant, ref_cfg,
                              device, {"fpo_latent_weights": weights}))
    runs = run_all(cfg, tasks, RERUN)
    rows += [results | {"label": label} for label, results in zip(task_labels, runs)]
    labels = [UNIFORM] + [f"{name}, w = {w}" for name in CONTROL_TARGETS for w in ("0", "W")]
    n_prompts = len(rows[0]["prompt_wins"])
    differences = attribute_differences(rows, labels, seeds)
    table = report.compare_table(rows, labels, CONTROL_COLUMNS, seeds, {}, "FPO with")
    table += "\n" + report.control_table(differences, CONTROL_TARGETS, len(seeds), n_prompts)
    sets = "\n".join(
        f"- seed {seed}: " + "; ".join(f"{name} {','.join(map(str, latents))} (W = {heavy:.3f})"
                                      for name, (latents, heavy) in by_set.items())
        for seed, by_set in chosen.items()
    )
    control_md = f"{table}\nThe latents of each set, and its W, per reference:\n\n{sets}\n"
    figure = figures.control(differences, list(CONTROL_TARGETS), UNIFORM, len(seeds), n_prompts)
    write_outputs(out, "control", control_md, figure, started)


def attribute_differences(rows: list[dict], labels: list[str], seeds: list[int]) -> dict:
    """{row label: {"<attribute> - reference": (mean, low, high), "<attribute> - uniform": ...}}:
    the paired difference of the judge's per-prompt positive (or on-topic) fraction between the
    row's policy and the reference, and between it and FPO with every w_i = 1 (None for that row
    itself), bootstrapped over references, then prompts."""
    by_label_and_seed = {(row["label"], row["seed"]): row for row in rows}

    def per_prompt(label: str, side: str, key: str) -> list[list[float]]:
        return [by_label_and_seed[label, seed][side][key] for seed in seeds]

    differences = {}
    for label in labels:
        differences[label] = {}
        for column, key in ATTRIBUTES.items():
            policy = per_prompt(label, "policy", key)
            differences[label][f"{column} - reference"] = paired_difference(
                policy, per_prompt(label, "reference", key)
            )
            differences[label][f"{column} - uniform"] = None if label == UNIFORM else (
                paired_difference(policy, per_prompt(UNIFORM, "policy", key))
            )
    return differences


def uniform_feature_mse_terms(ref_cfg: Config, device) -> torch.Tensor:
    """Each latent's part of D(y) on the held-out pairs' responses, for FPO at the default
    settings (every w_i = 1) trained on this reference (stats.feature_mse_terms). Shape:
    (d_sae,)."""
    run_cfg, tag = variant_run(ref_cfg, device, {})
    reference, inputs = frozen_reference(run_cfg, device)
    policy, _ = load_policy(run_cfg, tag, reference, inputs.made_from, device)
    return feature_mse_terms(policy, reference, inputs.sae, run_cfg.sae.sae_layer,
                             held_out_batches(inputs, device), run_cfg.prefer.fpo_k)


def comparable_weight(terms: torch.Tensor, latents: list[int]) -> float:
    """W for a set of latents: the weight at which the set's part of D(y) equals the part of every
    other latent, as FPO with every w_i = 1 leaves them (terms, (d_sae,)), rounded to 3 decimals;
    at least 1, and at most (d_sae - n) / n for a set of n, where the set's latents weigh as
    much as all the others together (a set that hardly enters I(y) would otherwise need an
    unbounded weight).
    Example: parts 0.1 on the set and 0.4 on the rest give W = 4: 4 x 0.1 = 0.4."""
    in_set = terms[latents].sum().item()
    ceiling = max(1.0, (len(terms) - len(latents)) / len(latents))
    if in_set <= 0:
        return round(ceiling, 3)
    return round(min(max((terms.sum().item() - in_set) / in_set, 1.0), ceiling), 3)


def latent_sets(ref_cfg: Config, device) -> dict[str, list[int]]:
    """{set: latents}: the positive, negative and topic latents of stats.attribute_latents on
    the reference's held-out pairs, and a random set as large, in CONTROL_TARGETS' order."""
    reference, inputs = frozen_reference(ref_cfg, device)
    found = attribute_latents(reference, inputs.sae, ref_cfg.sae.sae_layer,
                              held_out_batches(inputs, device), inputs.enc, CONTROL_LATENTS)
    generator = torch.Generator().manual_seed(ref_cfg.run.seed)
    drawn = torch.randperm(inputs.sae.d_sae, generator=generator)[:CONTROL_LATENTS]
    return {
        "positive latents": found["positive"],
        "negative latents": found["negative"],
        "topic latents": found["topic"],
        "random latents": sorted(drawn.tolist()),
    }


# ----------------------------------------------------------------------------------------------
# --bound: does the change of the SAE codes bound the per-token KL (the paper's Appendix B), and
# does D(y) track SeqKL(y) (its Fig. 4-right)? On --compare's policies


def bound(cfg: LabConfig, device) -> None:
    """For the reference and every policy --compare trained, on each reference's held-out pairs
    (chosen and rejected responses): per generating position, KL(pi_ref || pi_theta) against
    M ||c_theta - c_ref||^2 (stats.bound_constant), and per response D(y) against SeqKL(y);
    then both along FPO's training at its pick (fpo_trajectory, the one run trained here).
    Writes bound.md and bound.svg."""
    out = Path(cfg.run.out_dir)
    compare_json = read_compare(cfg)  # its shape and policies were checked at start-up
    labels = list(compare_json["settings"])
    seeds = sorted({row["seed"] for row in compare_json["rows"]})
    print(f"\n== bound: {len(labels)} policies on {len(seeds)} references ==")
    started = time.time()
    tasks = {}  # (seed, part): per reference, the policies' terms and FPO trained once more
    for seed in seeds:
        # the compare's settings (k, batch size, ...), not this command line's
        ref_cfg = with_method(reference_run(cfg, seed, device, made_by=COMPARE_RESUME),
                              compare_settings(compare_json, seed, "FPO"))
        tasks[seed, "terms"] = (f"bound: {len(labels)} policies on reference {seed}",
                                policies_bound_terms, ref_cfg, device, labels)
        tasks[seed, "trajectory"] = (f"bound: FPO trained once more on reference {seed}",
                                     fpo_trajectory, ref_cfg, device,
                                     compare_json["settings"]["FPO"])
    results = dict(zip(tasks, run_all(cfg, list(tasks.values()), RERUN), strict=True))
    # label: per reference, bound_terms of every pair
    terms = {label: [results[seed, "terms"][0][label] for seed in seeds] for label in labels}
    constants = {seed: results[seed, "terms"][1] for seed in seeds}  # seed: M
    # seed: FPO's steps, and its mean SeqKL(y) and D(y) at each
    trajectories = {seed: results[seed, "trajectory"] for seed in seeds}
    means = {  # label: SeqKL(y) and D(y), mean over references and responses, 95% interval
        label: {name: bootstrap_mean([t[key].tolist() for t in by_seed])
                for name, key in BOUND_MEANS.items()}
        for label, by_seed in terms.items()
    }
    trajectory = trajectory_ranges(trajectories)
    table = report.bound_table(bound_summary(terms, constants, seeds), constants)
    table += "\n" + report.interval_table(
        "method", means, {"SeqKL(y)": ".3g", "D(y)": ".2g"},
        "The mean over the held-out pairs' responses of each reference, and its 95% bootstrap "
        "interval over references, then responses.",
    )
    table += "\n" + report.trajectory_table(trajectory, len(seeds))
    figure = figures.bound(means, trajectory, len(seeds))
    write_outputs(out, "bound", table, figure, started)


BOUND_MEANS = {"SeqKL(y)": "sequence_kl", "D(y)": "feature_mse"}  # column: bound_terms' key


def trajectory_ranges(trajectories: dict[int, dict]) -> list[tuple[int, dict]]:
    """FPO along training ({seed: fpo_trajectory}) as [(step, {"SeqKL(y)": (mean, min, max),
    "D(y)": ...}), ...] over the references: the trajectory table's and bound.svg's numbers."""
    by_seed = list(trajectories.values())
    return [
        (step, {
            name: (statistics.fmean(values), min(values), max(values))
            for name, key in BOUND_MEANS.items()
            for values in [[trajectory[key][i] for trajectory in by_seed]]
        })
        for i, step in enumerate(by_seed[0]["step"])
    ]


def policies_bound_terms(ref_cfg: Config, device, labels: list[str]) -> tuple[dict, float]:
    """({label: held_out_bound_terms of its compare policy}, M): one reference's part of the
    bound, M from the smallest layer-norm scale any of its policies saw."""
    reference, inputs = frozen_reference(ref_cfg, device)
    terms = {}
    for label in labels:
        print(f"bound: seed {ref_cfg.run.seed}, {label}", flush=True)
        tag = compare_tag(label, ref_cfg.run.seed)
        policy, _ = load_policy(ref_cfg, tag, reference, inputs.made_from, device)
        terms[label] = held_out_bound_terms(policy, reference, inputs, ref_cfg, device)
    sigma = min(t["sigma"].min().item() for t in terms.values())
    return terms, bound_constant(reference, inputs.sae, sigma)


def fpo_trajectory(ref_cfg: Config, device, settings: dict) -> dict:
    """FPO trained at `settings` once more, judged by its mean SeqKL(y) and D(y) on the held-out
    responses at every fifth of its steps (the analogue of the paper's Fig. 4-right):
    {"step": [...], "sequence_kl": [...], "feature_mse": [...]}; read back from
    bound_fpo_trajectory.json when made from the same reference and settings."""
    run_cfg = with_method(ref_cfg, settings)
    every = max(1, run_cfg.prefer.pref_steps // 5)
    tag = "bound_fpo_trajectory"
    out = Path(run_cfg.run.out_dir)
    made_from = inputs_made_from(run_cfg, device) | {
        "settings": stage_settings(run_cfg, "prefer")
    }
    saved = saved_run(out / f"{tag}.json", made_from, needs=TRAJECTORY_KEYS)
    if saved is not None:
        return {key: saved[key] for key in TRAJECTORY_KEYS}
    reference, inputs = frozen_reference(ref_cfg, device)
    trajectory = {key: [] for key in TRAJECTORY_KEYS}

    def measure(step: int, policy) -> bool:
        terms = held_out_bound_terms(policy, reference, inputs, run_cfg, device)
        trajectory["step"].append(step)
        trajectory["sequence_kl"].append(terms["sequence_kl"].mean().item())
        trajectory["feature_mse"].append(terms["feature_mse"].mean().item())
        return True

    train_policy(run_cfg, device, run_cfg.run.seed, tag, judge_every=every, judge=measure)
    write_json(out / f"{tag}.json",
               trajectory | {"made_from": made_from, "cpu_threads": torch.get_num_threads()})
    return trajectory


TRAJECTORY_KEYS = ("step", "sequence_kl", "feature_mse")


def held_out_batches(inputs, device):
    """(input_ids (2B, T), response_mask (2B, T)) of every held-out pair, 64 pairs at a time,
    chosen rows first in each."""
    eos = data.eos_id(inputs.enc)
    for _, input_ids, mask in data.every_pair(inputs.test_pairs, 64, 0, eos, device):
        yield input_ids, mask


def held_out_bound_terms(policy, reference, inputs, ref_cfg: Config, device) -> dict:
    """bound_terms over every held-out pair, batch by batch (chosen rows first in each), on the
    CPU, with `is_chosen` per response."""
    batches = []
    for input_ids, mask in held_out_batches(inputs, device):
        terms = bound_terms(policy, reference, inputs.sae, ref_cfg.sae.sae_layer, input_ids,
                            mask, ref_cfg.prefer.fpo_k)
        half = len(input_ids) // 2
        terms["is_chosen"] = torch.arange(len(input_ids), device=input_ids.device) < half
        batches.append({key: value.cpu() for key, value in terms.items()})
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def bound_summary(terms: dict, constants: dict, seeds: list[int]) -> dict[str, dict]:
    """Per method: how often KL_t <= M ||dc_t||^2 holds, the quantiles of KL_t / (M ||dc_t||^2)
    where the codes moved, the median of KL_t over its first step, a quarter of the logits'
    squared distance, Spearman's correlation of KL_t with ||dc_t||^2 (per position) and of
    SeqKL(y) with D(y) (per response), and of the margins SeqKL(y_l) - SeqKL(y_w) with
    D(y_l) - D(y_w) (per pair), each with a bootstrap interval over references and items."""
    summary = {}
    for label, by_seed in terms.items():
        bounds = [constants[seed] * t["code_gap"] for seed, t in zip(seeds, by_seed)]
        kls = [t["kl"] for t in by_seed]
        ratios = torch.cat([kl[b > 0] / b[b > 0] for kl, b in zip(kls, bounds)])
        margins = {
            key: [t[key][~t["is_chosen"]] - t[key][t["is_chosen"]] for t in by_seed]
            for key in ("sequence_kl", "feature_mse")
        }
        logit_gaps = torch.cat([t["logit_gap"] for t in by_seed])
        moved = logit_gaps > 0
        summary[label] = {
            "holds": torch.cat([kl <= b for kl, b in zip(kls, bounds)]).double().mean().item(),
            "softmax step": torch.median(torch.cat(kls)[moved] / (logit_gaps[moved] / 4)).item(),
            "ratio quantiles": torch.quantile(
                ratios.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
            ).tolist() if len(ratios) else [float("nan")] * 3,
            "token": bootstrap_spearman(kls, [t["code_gap"] for t in by_seed]),
            "response": bootstrap_spearman(
                [t["sequence_kl"] for t in by_seed], [t["feature_mse"] for t in by_seed]
            ),
            "margin": bootstrap_spearman(margins["sequence_kl"], margins["feature_mse"]),
        }
    return summary
