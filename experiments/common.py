"""What every experiment shares: one reference pipeline per seed, made once; what a saved result
was made from, so a rerun reuses it only when nothing changed; runs trained in a child process;
the experiments' own training loop (snapshots along the way, the loop's memory); what each
experiment writes.

A reference is one seed's whole pipeline: its own corpus, pretrained GPT, SAE, cache and pairs,
made once in out_dir/ref_seed<seed>/ and shared by every experiment, so the picks and the
intervals see how much the reference itself varies.
"""

import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import re
import signal
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

import data
import train
from config import Config, stage_settings
from experiments.stats import paired_difference
from loading import load_gpt, load_trained_sae, save_policy
from runtime import (
    UsageError, autocast, batch_indices, changed_settings, check_finite, check_finite_model,
    learning_rate, load_checkpoint, log_line, read_json, synchronize, write_text,
)


def with_method(cfg: Config, overrides: dict) -> Config:
    """cfg with some preference settings changed ({"method": "dpo", "beta": 0.1}, ...)."""
    return dataclasses.replace(cfg, prefer=dataclasses.replace(cfg.prefer, **overrides))


def compare_tag(label: str, seed: int) -> str:
    """The file name of --compare's run of a row on one reference: "FPO (alpha=0)", 1337 ->
    "compare_fpo_alpha_0_seed1337"."""
    return "compare_" + re.sub(r"\W+", "_", label.lower()).strip("_") + f"_seed{seed}"


# ----------------------------------------------------------------------------------------------
# References, and what a saved result was made from


def reference_run(cfg: Config, seed: int, device) -> Config:
    """cfg for one seed's whole pipeline. Each seed has its own directory,
    out_dir/ref_seed<seed>/: its reference GPT and SAE are pretrained there once (the stage
    already done is skipped, so an interrupted experiment resumes) and shared by every
    experiment; every run trained from them is saved beside them. A GPT or SAE there made with
    other settings is refused, never silently reused. What runs are made from: inputs_made_from.
    """
    ref_dir = Path(cfg.run.out_dir) / f"ref_seed{seed}"
    ref_cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, seed=seed, out_dir=str(ref_dir))
    )
    make_once(ref_cfg, "pretrain", device)
    make_once(ref_cfg, "sae", device)
    return ref_cfg


def make_once(cfg: Config, stage: str, device) -> None:
    """Make out_dir's gpt.pt (stage pretrain) or sae.pt (stage sae) unless it is there. One made
    with other settings is refused, never silently reused or overwritten."""
    ref_dir = Path(cfg.run.out_dir)
    name = {"pretrain": "gpt.pt", "sae": "sae.pt"}[stage]
    if not (ref_dir / name).exists():
        {"pretrain": train.pretrain, "sae": train.train_sae_stage}[stage](cfg, device)
        return
    saved = load_checkpoint(ref_dir / name, name.removesuffix(".pt"), "")["config"]
    shown = changed_settings(saved, stage_settings(cfg, stage))
    if shown:
        raise UsageError(
            f"{ref_dir / name} was made with {shown}, not this run's settings: delete {ref_dir} "
            "to make it anew, or pass another --out_dir"
        )


def frozen_reference(cfg: Config, device) -> tuple[torch.nn.Module, train.PreferenceInputs]:
    """The reference GPT of cfg's out_dir, frozen, and the inputs every run there trains from
    (the SAE, the pairs, the cache)."""
    reference, gpt_fingerprint = load_gpt(cfg, device)
    reference.eval().requires_grad_(False)
    return reference, train.load_preference_inputs(cfg, reference, gpt_fingerprint, device)


def data_settings(cfg: Config) -> dict:
    """The preference pairs a run trains and is judged on: the user's file (by its contents), or
    the toy world's, which its settings make."""
    if cfg.run.preference_file:
        contents = Path(cfg.run.preference_file).read_bytes()
        return {
            "preference_file": cfg.run.preference_file,
            "sha256": hashlib.sha256(contents).hexdigest(),
            "skip_bad_rows": cfg.run.skip_bad_rows,
            "n_test_pairs": cfg.prefer.n_test_pairs,
        }
    return {"n_pairs": cfg.prefer.n_pairs, "n_test_pairs": cfg.prefer.n_test_pairs,
            "seed": cfg.run.seed}


def inputs_made_from(cfg: Config, device) -> dict:
    """What every run of an experiment starts from: the reference GPT and the SAE (fingerprints
    of their weights) and the data. Each artifact adds the settings it was made with."""
    gpt_fingerprint = load_gpt(cfg, device)[1]
    return {
        "GPT": gpt_fingerprint,
        "SAE": load_trained_sae(cfg, gpt_fingerprint, device)[1],
        "data": data_settings(cfg),
    }


def saved_run(path: Path, made_from: dict, needs: tuple[str, ...] = ()) -> dict | None:
    """The results a finished run saved at `path`, if it was made from exactly `made_from` and
    holds every key of `needs` (a file of an older version may lack one); else None, with the
    reason, and the run is done again: the file is only a cache of that run."""
    if not path.exists():
        return None
    try:
        saved = read_json(path, how_to_make="")
    except UsageError:  # truncated (a crash mid-write, before writes were atomic) or not JSON
        print(f"{path} is not readable JSON; running it again")
        return None
    recorded = saved.get("made_from") if isinstance(saved, dict) else None
    lacks = [key for key in needs if key not in saved] if isinstance(saved, dict) else []
    if recorded == made_from and not lacks:
        return saved
    if lacks:
        print(f"{path} has no {', '.join(lacks)} (an older version wrote it); running it again")
        return None
    recorded = recorded if isinstance(recorded, dict) else {}
    changed = [name for name in made_from | recorded if recorded.get(name) != made_from.get(name)]
    print(f"{path} was made from another {' and '.join(changed)}; running it again")
    return None


# ----------------------------------------------------------------------------------------------
# A run in a child process: its memory is its own, and Ctrl-C or a kill reaches it


def in_child_process(function, *args):
    """Run function(*args) in a fresh process and return its result, so peak memory is the
    method's own and nothing (allocator state, caches) leaks from one method to the next. The
    child uses this process's CPU thread count (--threads), which decides how reductions round.

    However the child stops, this process hears of it: the child's exception comes back pickled;
    a child killed outright (SIGKILL, the out-of-memory killer) raises BrokenProcessPool. Ctrl-C
    here is passed on to the child, whose training loop stops at a step boundary, saves and
    raises Interrupted; this process waits for that rather than dying first. The child ends
    itself when this process is gone."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=context,
        initializer=start_child,
        initargs=(torch.get_num_threads(), os.getpid()),
    ) as pool:
        child = pool.submit(os.getpid).result()
        ctrl_c = threading.Event()

        def pass_on_ctrl_c(signum, frame):
            ctrl_c.set()
            # even when a terminal's Ctrl-C reached the child too: its loop just notes a request
            with contextlib.suppress(ProcessLookupError):  # the child has just finished
                os.kill(child, signal.SIGINT)

        previous = signal.signal(signal.SIGINT, pass_on_ctrl_c)
        try:
            result = pool.submit(function, *args).result()
        except BrokenProcessPool:
            if ctrl_c.is_set():  # killed by its Ctrl-C before its training loop began
                raise KeyboardInterrupt from None
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
    if ctrl_c.is_set():  # the child finished before the Ctrl-C reached its loop: stop here
        raise KeyboardInterrupt
    return result


def start_child(threads: int, parent: int) -> None:
    """The child's first steps: the parent's thread count, and a watch that ends the child once
    the parent is gone (killed outright), as nothing would ever read its result."""
    torch.set_num_threads(threads)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is handed to another parent (init)
        time.sleep(0.1)
    os._exit(1)


def train_in_child(tag: str, to_continue: str, function, *args):
    """in_child_process(function, *args) for the run `tag`, with every way it can fail as one
    `error:` line that names the run and says how to continue (`to_continue`). Interrupted
    (Ctrl-C) passes through: it names the run's resume file and says `--resume`."""
    try:
        return in_child_process(function, *args)
    except BrokenProcessPool:
        raise UsageError(
            f"{tag}: the process training it stopped without a result (killed by a signal, "
            f"perhaps by the out-of-memory killer); {to_continue}"
        ) from None
    except (MemoryError, torch.OutOfMemoryError) as error:
        raise UsageError(
            f"{tag}: out of memory ({type(error).__name__}); lower --pref_batch_size or free "
            f"memory, then {to_continue}"
        ) from None
    except (UsageError, data.DataError) as error:
        raise UsageError(f"{tag}: {error}") from None


# ----------------------------------------------------------------------------------------------
# The experiments' training loop: train.py's step, with snapshots and a meter around it


def train_policy(
    cfg: Config, device, seed: int, tag: str, snapshot_every: int = 0, measure=None
) -> dict:
    """Train one policy as train.train_preference does (the same models, batches and steps, so
    the same weights, bit for bit), without its resume and Ctrl-C bookkeeping, and with what the
    experiments measure along the way:
    - snapshot_every > 0: the policy after every that many steps, as out_dir/<tag>_step<N>.pt;
    - measure: a context manager around the loop alone (bench.LoopPeakMemory).
    Saves out_dir/<tag>.pt and <tag>_log.jsonl. Returns the median step time in seconds. An
    interrupted run is trained again from its first step by the next command."""
    pref_cfg = cfg.prefer
    print(f"\n== prefer: {pref_cfg.method} ({tag}) ==\n{pref_cfg}")
    policy, inputs, reference = train.preference_models(cfg, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pref_cfg.pref_lr, weight_decay=0.0)
    out = Path(cfg.run.out_dir)
    settings = stage_settings(cfg, "prefer", seed)
    eos = data.eos_id(inputs.enc)
    never_saved = out / f"{tag}.resume.pt"  # what a non-finite loss names: nothing was saved
    records = []
    policy.train()
    started = time.time()
    with measure or contextlib.nullcontext():
        for step in range(pref_cfg.pref_steps):
            # batch: the B pairs train_preference draws at this step
            picks = batch_indices(len(inputs.train_pairs), pref_cfg.pref_batch_size, seed, step)
            batch = data.pair_batch(
                inputs.train_pairs, picks, row_offset=0, eos_id=eos, device=device
            )
            # learning rate, forward, loss, update
            records.append(
                timed_step(cfg, policy, optimizer, reference, inputs, batch, step, never_saved)
            )
            # snapshot, and a progress line every log_every steps
            if snapshot_every and (step + 1) % snapshot_every == 0:
                save_policy(out / f"{tag}_step{step + 1}.pt", settings, inputs.made_from, policy)
            if step % cfg.run.log_every == 0 or step == pref_cfg.pref_steps - 1:
                shown = {key: value for key, value in records[-1].items() if key != "step"}
                print(log_line("prefer", step, pref_cfg.pref_steps, started, **shown), flush=True)
    check_finite_model(policy, "prefer", "--pref_lr or --beta too high", probe=batch[1])
    save_policy(out / f"{tag}.pt", settings, inputs.made_from, policy)
    train.write_jsonl(out / f"{tag}_log.jsonl", records)
    return {"median_step_s": statistics.median(r["ms_per_step"] for r in records) / 1000}


def timed_step(
    cfg: Config, policy, optimizer, reference, inputs, batch, step: int, last_good: Path
) -> dict:
    """One step of train_preference's loop on `batch` (its learning rate, loss, finite check and
    update, train.py's functions each) and its log record, with ms_per_step timing the step up to
    the update; a non-finite loss stops with one line naming `last_good`."""
    pref_cfg = cfg.prefer
    device = batch[1].device
    started = time.perf_counter()
    # learning rate (linear warm-up, then constant), forward and loss
    lr = learning_rate(step, pref_cfg.pref_lr, pref_cfg.warmup_steps, pref_cfg.pref_steps,
                       "constant")
    train.set_learning_rate(optimizer, lr)
    with autocast(device):
        result = train.preference_losses(
            pref_cfg, cfg.sae.sae_layer, policy, batch, inputs, reference
        )
    loss = result.losses.mean()
    # stop on a non-finite loss; update
    check_finite(loss, "prefer", step, last_good, train.DIVERGED)
    train.update(policy, optimizer, loss, pref_cfg.grad_clip)
    synchronize(device)
    ms_per_step = 1000 * (time.perf_counter() - started)
    return train.step_record(cfg, step, loss, result, ms_per_step, policy, batch, inputs)


# ----------------------------------------------------------------------------------------------
# What the experiments write


def row_differences(rows: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """{"A - B": (mean, low, high)}: paired differences in per-prompt wins of rows A and B (by
    label) over the same references and prompts, for each (A, B) of pairs."""
    by_seed = sorted(rows, key=lambda r: r["seed"])

    def wins(label: str) -> list[list[float]]:
        return [row["prompt_wins"] for row in by_seed if row["label"] == label]

    return {f"{a} - {b}": paired_difference(wins(a), wins(b)) for a, b in pairs}


def write_outputs(out: Path, name: str, table: str, chart: str, started: float) -> None:
    """An experiment's results: out/<name>.md (its tables) and out/<name>.svg (its picture), then
    the tables, where both went and how long it took."""
    write_text(out / f"{name}.md", table)
    write_text(out / f"{name}.svg", chart)
    print("\n" + table + f"\n{name}: wrote {out / f'{name}.md'} and {out / f'{name}.svg'} | "
          f"{(time.time() - started) / 60:.1f} min")
