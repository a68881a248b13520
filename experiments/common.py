"""What every experiment shares: one reference pipeline per seed, made once; what a saved result
was made from, so a rerun reuses it only when nothing changed; runs trained in a child process;
the experiments' own training loop (judged along the way, the loop's memory); what each
experiment writes.

A reference is one seed's whole pipeline: its own corpus, pretrained GPT, SAE, cache and pairs,
made once in out_dir/ref_seed<seed>/ and shared by every experiment, so the picks and the
intervals see how much the reference itself varies.
"""

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

import data
import train
from config import Config, PreferenceConfig, stage_settings
from experiments import figures
from experiments.stats import paired_difference
from loading import load_gpt, load_trained_sae, save_policy
from runtime import (
    Interrupted, UsageError, autocast, batch_indices, changed_settings, check_finite,
    check_finite_model, learning_rate, load_checkpoint, log_line, process_is_alive, read_json,
    synchronize, write_json, write_text,
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


def reference_run(cfg: Config, seed: int, device, made_by: str = "") -> Config:
    """cfg for one seed's whole pipeline. Each seed has its own directory,
    out_dir/ref_seed<seed>/: its reference GPT and SAE are pretrained there once (the stage
    already done is skipped, so an interrupted experiment resumes) and shared by every
    experiment; every run trained from them is saved beside them. A GPT or SAE there made with
    other settings, or with another CPU thread count, is refused, never silently reused. An
    experiment that makes no reference passes `made_by`, the command that makes one: a missing
    GPT or SAE is refused, naming it. What runs are made from: inputs_made_from.
    """
    ref_dir = reference_dir(cfg, seed)
    ref_cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, seed=seed, out_dir=str(ref_dir))
    )
    check_reference_dir(ref_dir, torch.get_num_threads())
    for name in ("gpt.pt", "sae.pt"):
        if made_by and not (ref_dir / name).is_file():
            raise UsageError(f"{ref_dir / name} not found: run {made_by} (this experiment "
                             "trains nothing)")
    made = [make_once(ref_cfg, "pretrain", device), make_once(ref_cfg, "sae", device)]
    if any(made) and not (ref_dir / THREADS_FILE).exists():
        write_json(ref_dir / THREADS_FILE, {"threads": torch.get_num_threads()})
    return ref_cfg


THREADS_FILE = "threads.json"  # a reference's CPU thread count (older references lack it)


def reference_dir(cfg: Config, seed: int) -> Path:
    return Path(cfg.run.out_dir) / f"ref_seed{seed}"


def threads_of(cfg: Config) -> int:
    """The CPU thread count a command runs with (train.start_run sets it)."""
    return cfg.run.threads or torch.get_num_threads()


def check_reference_dir(ref_dir: Path, threads: int) -> None:
    """Refuse, before any work, a reference path that is no directory, and a reference made with
    another CPU thread count: its GPT and SAE round differently, so runs made from it now would
    not match the ones it holds."""
    if ref_dir.exists() and not ref_dir.is_dir():
        raise UsageError(
            f"{ref_dir} is a file, not a reference's directory (one seed's GPT, SAE and runs): "
            "move it away or delete it"
        )
    record = ref_dir / THREADS_FILE
    if not record.exists():
        return
    saved = read_json(record, "rerun")
    made_with = saved.get("threads") if isinstance(saved, dict) else None
    if made_with != threads:
        raise UsageError(
            f"{ref_dir} was made with {made_with} CPU threads, this run has {threads} (they "
            f"round differently): rerun with --threads {made_with}, or pass another --out_dir"
        )


@contextlib.contextmanager
def reference_kept(ref_cfg: Config):
    """Name the cause when a reference's GPT or SAE disappears while a run reads it (deleted
    mid-experiment): rerunning the experiment makes the reference again, not `python train.py`,
    which the run's own message would suggest."""
    try:
        yield
    except UsageError:
        ref_dir = Path(ref_cfg.run.out_dir)
        gone = [name for name in ("gpt.pt", "sae.pt") if not (ref_dir / name).is_file()]
        if not gone:
            raise
        raise UsageError(
            f"{ref_dir / gone[0]} is gone (deleted while the experiment ran?): rerun the same "
            "command with --resume, which makes the reference again"
        ) from None


def make_once(cfg: Config, stage: str, device) -> bool:
    """Make out_dir's gpt.pt (stage pretrain) or sae.pt (stage sae) unless it is there, and say
    whether it was made. One made with other settings is refused, never silently reused or
    overwritten."""
    ref_dir = Path(cfg.run.out_dir)
    name = {"pretrain": "gpt.pt", "sae": "sae.pt"}[stage]
    if not (ref_dir / name).exists():
        {"pretrain": train.pretrain, "sae": train.train_sae_stage}[stage](cfg, device)
        return True
    saved = load_checkpoint(ref_dir / name, name.removesuffix(".pt"), "")["config"]
    shown = changed_settings(saved, stage_settings(cfg, stage))
    if shown:
        raise UsageError(
            f"{ref_dir / name} was made with {shown}, not this run's settings: delete {ref_dir} "
            "to make it anew, or pass another --out_dir"
        )
    return False


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
    """The results a finished run saved at `path`, if it was made from exactly `made_from`, with
    this process's CPU thread count (its `cpu_threads`, where it records one), and holds every key
    of `needs` (a file of an older version may lack one); else None, with the reason, and the run
    is done again: the file is only a cache of that run."""
    if not path.exists():
        return None
    try:
        saved = read_json(path, how_to_make="")
    except UsageError:  # truncated (a crash mid-write, before writes were atomic) or not JSON
        print(f"{path} is not readable JSON; running it again")
        return None
    recorded = saved.get("made_from") if isinstance(saved, dict) else None
    lacks = [key for key in needs if key not in saved] if isinstance(saved, dict) else []
    # The CPU thread count decides how reductions round; files of older versions lack it.
    threads = saved.get("cpu_threads") if isinstance(saved, dict) else None
    same_threads = threads in (None, torch.get_num_threads())
    if recorded == made_from and not lacks and same_threads:
        return saved
    if lacks:
        print(f"{path} has no {', '.join(lacks)} (an older version wrote it); running it again")
        return None
    if recorded == made_from:
        print(f"{path} was made with {threads} CPU threads, this run has "
              f"{torch.get_num_threads()} (they round differently); running it again")
        return None
    recorded = recorded if isinstance(recorded, dict) else {}
    changed = [name for name in made_from | recorded if recorded.get(name) != made_from.get(name)]
    print(f"{path} was made from another {' and '.join(changed)}; running it again")
    return None


class Stopped(Interrupted):
    """Ctrl-C outside a training loop (a child starting or saving, the parent judging): one line
    that says how to continue, and exit code 130, as Interrupted."""

    def __init__(self, message: str):
        Exception.__init__(self, message)  # not Interrupted's: no stage or step to name

    def __reduce__(self):
        return type(self), (str(self),)


# ----------------------------------------------------------------------------------------------
# --compare's results, as the experiments built on them read them

COMPARE_RESUME = "`python -m experiments --compare --resume`"  # what remakes compare's policies


def read_compare(cfg: Config) -> dict:
    """out_dir/compare.json, refused unless it has the shape --compare writes: its rows' settings
    by label, FPO's among them, and one row per label on each reference, each with its seed and
    what it was made from."""
    path = Path(cfg.run.out_dir) / "compare.json"
    saved = read_json(path, "run `python -m experiments --compare` first")

    def refuse(problem: str):
        raise UsageError(f"{path} is not what --compare writes ({problem}): rerun {COMPARE_RESUME}")

    if not isinstance(saved, dict):
        refuse(f"a JSON {type(saved).__name__}, not an object")
    settings, rows = saved.get("settings"), saved.get("rows")
    if not (isinstance(settings, dict) and "FPO" in settings):
        refuse("no 'settings' with FPO's")
    if not (isinstance(rows, list) and rows):
        refuse("no 'rows'")
    for row in rows:
        made_from = row.get("made_from") if isinstance(row, dict) else None
        seed = row.get("seed") if isinstance(row, dict) else None
        if not (isinstance(made_from, dict) and isinstance(made_from.get("settings"), dict)
                and row.get("label") in settings and type(seed) is int
                and 0 <= seed < 2**32):
            refuse("a row without its label, seed or what it was made from")
    for seed in {row["seed"] for row in rows}:
        labels = sorted(row["label"] for row in rows if row["seed"] == seed)
        if labels != sorted(settings):
            refuse(f"reference {seed} lacks a row, or has one twice")
    return saved


def compare_settings(compare_json: dict, seed: int, label: str) -> dict:
    """The preference settings a --compare row was trained with (every one, not only its
    pick's): {"method": "fpo", "beta": 1.0, ..., "fpo_k": 32, ...}."""
    row = next(r for r in compare_json["rows"] if r["seed"] == seed and r["label"] == label)
    fields = {f.name for f in dataclasses.fields(PreferenceConfig)}
    return {key: value for key, value in row["made_from"]["settings"].items() if key in fields}


def check_compare_policies(cfg: Config, compare_json: dict) -> None:
    """Refuse, before any work, compare.json's policies where they are not the ones its rows
    describe: a reference or policy file missing; a policy trained with other settings than its
    row's (a later --compare stopped midway, say), or from another GPT or SAE; rows trained with
    another CPU thread count, or on other data, than this command's flags give."""
    threads = threads_of(cfg)
    for row in compare_json["rows"]:
        seed, label = row["seed"], row["label"]
        ref_dir = reference_dir(cfg, seed)
        check_reference_dir(ref_dir, threads)
        for name in ("gpt.pt", "sae.pt", "reference_cache.pt", f"{compare_tag(label, seed)}.pt"):
            if not (ref_dir / name).is_file():
                raise UsageError(f"{ref_dir / name} not found (compare.json's {label} on "
                                 f"reference {seed}): rerun {COMPARE_RESUME}")
        made_with = row.get("cpu_threads")
        if made_with not in (None, threads):
            raise UsageError(f"compare.json's rows were trained with {made_with} CPU threads, "
                             f"this run has {threads}: rerun with --threads {made_with}")
        seed_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
        if row["made_from"].get("data") != data_settings(seed_cfg):
            raise UsageError("compare.json's rows were made from other data than this run's "
                             "(--n_pairs, --n_test_pairs): pass the flags --compare ran with")
        path = ref_dir / f"{compare_tag(label, seed)}.pt"
        unlike = policy_unlike(path, row["made_from"])
        if unlike:
            raise UsageError(
                f"{path} is not compare.json's {label} (trained with {unlike}): "
                f"rerun {COMPARE_RESUME}"
            )


def policy_unlike(path: Path, row_made_from: dict) -> str:
    """How the policy at `path` differs from the one a compare row records (its settings, the GPT
    and SAE it was trained from), as "--pref_lr 0.03 (the row's: 6e-05)"; empty if it is that
    row's policy."""
    policy = load_checkpoint(path, "policy", f"rerun {COMPARE_RESUME}")
    trained, expected = policy["config"], row_made_from["settings"]
    differ = sorted(key for key in trained.keys() | expected.keys()
                    if trained.get(key) != expected.get(key))
    trained_from = {"reference model": row_made_from.get("GPT"), "SAE": row_made_from.get("SAE")}
    if not differ and policy["made_from"] != trained_from:
        return "another GPT or SAE"
    return ", ".join(f"--{key} {trained.get(key)!r} (the row's: {expected.get(key)!r})"
                     for key in differ)


# ----------------------------------------------------------------------------------------------
# A run in a child process: its memory is its own, and Ctrl-C or a kill reaches it


def in_child_process(function, *args):
    """Run function(*args) in a fresh process and return its result, so peak memory is the
    method's own and nothing (allocator state, caches) leaks from one method to the next. The
    child uses this process's CPU thread count (--threads), which decides how reductions round.

    However the child stops, this process hears of it: the child's exception comes back pickled;
    a child killed outright (SIGKILL, the out-of-memory killer) raises BrokenProcessPool. Ctrl-C
    here is passed on to the child, whose training loop stops at a step boundary, saves and
    raises Interrupted; this process waits for that rather than dying first. A Ctrl-C at any
    other moment of the child's life (starting, importing torch, loading, saving) raises
    KeyboardInterrupt here, and nothing in the child prints a traceback. The child ends itself
    when this process is gone."""
    ctrl_c = threading.Event()
    child = None

    def pass_on_ctrl_c(signum, frame):
        ctrl_c.set()
        # even when a terminal's Ctrl-C reached the child too: its loop just notes a request
        if child is not None:
            with contextlib.suppress(ProcessLookupError):  # the child has just finished
                os.kill(child, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, pass_on_ctrl_c)
    try:
        with ProcessPoolExecutor(
            max_workers=1,
            mp_context=child_processes(),
            initializer=start_child,
            initargs=(torch.get_num_threads(), os.getpid()),
        ) as pool:
            # The child is started with SIGINT blocked (a blocked signal stays blocked across
            # exec and fork), so a Ctrl-C while it (or the fork server) imports torch waits for
            # start_child instead of raising mid-import; here it is only deferred to the next
            # line.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                started = pool.submit(os.getpid)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            child = started.result()
            if ctrl_c.is_set():  # Ctrl-C while the child started: run nothing in it
                raise KeyboardInterrupt
            result = pool.submit(run_in_child, function, *args).result()
    except BrokenProcessPool:
        if ctrl_c.is_set():  # killed by its Ctrl-C before its training loop began
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if ctrl_c.is_set():  # the child finished before the Ctrl-C reached its loop: stop here
        raise KeyboardInterrupt
    return result


def child_processes():
    """Where child processes come from. On Linux, a fork server that imported torch and the
    pipeline once: a child starts in a fraction of a second instead of the seconds a new
    interpreter takes to import torch, and inherits nothing of this process (the server never
    trains, nor starts CUDA, which a forked process could not start again). Elsewhere a new
    interpreter each time ("spawn"): macOS's system libraries are not safe to fork."""
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: torch imports it at a child's first optimizer, another two seconds
    context.set_forkserver_preload(["torch", "torch._dynamo", "train", "experiments.common"])
    return context


CHILD_CTRL_C = threading.Event()  # in a child: a Ctrl-C that came before its task began


def note_ctrl_c(signum, frame) -> None:
    CHILD_CTRL_C.set()


def start_child(threads: int, experiment: int) -> None:
    """The child's first steps: the experiment's thread count; Ctrl-C noted rather than raised,
    then unblocked (one pressed while it started is noted now); and a watch that ends the child
    once the experiment's process is gone (killed outright), as nothing would ever read its
    result."""
    torch.set_num_threads(threads)
    threading.Thread(target=exit_with_experiment, args=(experiment,), daemon=True).start()
    signal.signal(signal.SIGINT, note_ctrl_c)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_in_child(function, *args):
    """function(*args) in the child, where Ctrl-C raises KeyboardInterrupt again (the training
    loop turns it into a save at a step boundary). The exception goes back to the parent,
    pickled, and nothing here prints it; a second Ctrl-C (the parent passes each on) is noted,
    so it cannot break that reply."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if CHILD_CTRL_C.is_set():
            raise KeyboardInterrupt
        return function(*args)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, note_ctrl_c)
        raise


def exit_with_experiment(experiment: int) -> None:
    parent = os.getppid()  # the experiment, or the fork server it started
    while os.getppid() == parent and process_is_alive(experiment):
        time.sleep(0.1)  # an orphan is handed to another parent (init)
    os._exit(1)


def train_in_child(tag: str, to_continue: str, function, *args):
    """in_child_process(function, *args) for the run `tag`, failing as run_errors says."""
    with run_errors(tag, to_continue):
        return in_child_process(function, *args)


@contextlib.contextmanager
def run_errors(tag: str, to_continue: str):
    """Every way a run in another process can fail, as one `error:` line that names the run and
    says how to continue (`to_continue`). Interrupted (Ctrl-C) passes through: it names the run's
    resume file and says `--resume`; a Ctrl-C at any other moment is Stopped, naming the run and
    `to_continue`."""
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(
            f"{tag} interrupted (Ctrl-C) outside its training loop; {to_continue}"
        ) from None
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
# Runs side by side: --workers processes that live through an experiment


def run_all(cfg, tasks: list[tuple], to_continue: str) -> list:
    """[function(*args) for tag, function, *args in tasks], in the tasks' order, by run_after."""
    return [result for result, _ in run_after(cfg, tasks, lambda result: [], to_continue)]


def run_after(cfg, tasks: list[tuple], then, to_continue: str) -> list[tuple]:
    """[(function(*args), [the results of then(that result)'s tasks]) for tag, function, *args
    in tasks], in the tasks' order. A task's follow-ups (a list of tasks like `tasks`) start as
    soon as it has ended: a reference's runs need not wait for the other references.

    With --workers 1, one after another in this process. With more, that many processes,
    started once (each imports torch once and uses this process's CPU thread count), take the
    tasks in turn: on a 2-core CPU, `--threads 1 --workers 2` runs two at once. A task's result
    depends only on its own inputs and seeds, so it is the same either way. The first failure
    cancels the tasks not yet begun (those running finish and save) and is one `error:` line
    naming its task (`tag`), as run_errors says. Ctrl-C is passed on to every worker: a run in
    train_preference stops at a step boundary and names its --resume file, as it would alone."""
    if cfg.experiment.workers == 1:
        return [
            (result, [function(*args) for tag, function, *args in then(result)])
            for tag, function, *args in tasks
            for result in [function(*args)]
        ]

    def pass_on_ctrl_c(signum, frame):
        for worker in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(worker.pid, signal.SIGINT)

    def submit(tag, function, *args) -> tuple:
        # Workers start with SIGINT blocked, as in in_child_process: a Ctrl-C while one imports
        # torch is noted by start_child rather than raised mid-import.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return tag, pool.submit(run_in_child, function, *args)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    previous = signal.signal(signal.SIGINT, pass_on_ctrl_c)
    pool = ProcessPoolExecutor(
        cfg.experiment.workers,
        mp_context=child_processes(),
        initializer=start_child,
        initargs=(torch.get_num_threads(), os.getpid()),
    )
    try:
        firsts = [submit(*task) for task in tasks]
        follow_ups = {future: [] for _, future in firsts}  # a task's future: its follow-ups'
        pending = set(follow_ups)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            if any(future.exception() is not None for future in done):
                break
            for future in done & follow_ups.keys():
                follow_ups[future] = [submit(*task) for task in then(future.result())]
                pending |= {follow_up for _, follow_up in follow_ups[future]}
        pool.shutdown(wait=True, cancel_futures=True)
        in_order = [each for first in firsts for each in [first, *follow_ups[first[1]]]]
        for tag, future in in_order:  # the first failure, in the tasks' order
            if not future.cancelled() and future.exception() is not None:
                with run_errors(tag, to_continue):
                    future.result()
        return [(future.result(), [follow_up.result() for _, follow_up in follow_ups[future]])
                for _, future in firsts]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGINT, previous)


SAMPLES: dict[str, dict] = {}  # each reference's judged samples, made once in each process


def reference_samples(cfg: Config) -> dict:
    """The dict train.evaluate_policy fills with the samples of cfg's reference (out_dir) under
    cfg's judging settings, and reads back on every later call: one per process and reference,
    as they depend only on the seed."""
    key = json.dumps([cfg.run.out_dir, dataclasses.asdict(cfg.eval)], sort_keys=True)
    return SAMPLES.setdefault(key, {})


RERUN = "rerun the same command: finished runs are read back"  # how an experiment continues


def references_and_runs(cfg, seeds: list[int], device, runs_of, to_continue: str = RERUN
                        ) -> list[tuple]:
    """[((ref_cfg, made_from), [the results of runs_of(ref_cfg, made_from)'s tasks]) for each
    seed], where (ref_cfg, made_from) is prepared_reference(cfg, seed, device). By run_after: a
    reference's runs start as soon as it is ready."""
    tasks = [(f"reference {seed}", prepared_reference, cfg, seed, device) for seed in seeds]
    return run_after(cfg, tasks, lambda reference: runs_of(*reference), to_continue)


def prepared_reference(cfg: Config, seed: int, device) -> tuple[Config, dict]:
    """reference_run's config for one seed, with its cache built, and inputs_made_from."""
    print(f"reference {seed}: {reference_dir(cfg, seed)}", flush=True)
    ref_cfg = reference_run(cfg, seed, device)
    with reference_kept(ref_cfg):
        frozen_reference(ref_cfg, device)  # builds the cache: once, before runs read it
        return ref_cfg, inputs_made_from(ref_cfg, device)


# ----------------------------------------------------------------------------------------------
# The experiments' training loop: train.py's step, judged along the way, with a meter


def train_policy(
    cfg: Config, device, seed: int, tag: str, judge_every: int = 0, judge=None, measure=None
) -> dict:
    """Train one policy as train.train_preference does (the same models, batches and steps, so
    the same weights, bit for bit), without its resume and Ctrl-C bookkeeping, and with what the
    experiments measure along the way:
    - judge(step, policy) after every judge_every steps: the policy measured where it stands
      (judged_in_place); training stops there when it returns False;
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
            # a progress line every log_every steps; judged every judge_every, maybe stopped
            if step % cfg.run.log_every == 0 or step == pref_cfg.pref_steps - 1:
                shown = {key: value for key, value in records[-1].items() if key != "step"}
                print(log_line("prefer", step, pref_cfg.pref_steps, started, **shown), flush=True)
            if judge_every and (step + 1) % judge_every == 0:
                if not judged_in_place(judge, step + 1, policy):
                    break
    check_finite_model(policy, "prefer", "--pref_lr or --beta too high", probe=batch[1])
    save_policy(out / f"{tag}.pt", settings, inputs.made_from, policy)
    train.write_jsonl(out / f"{tag}_log.jsonl", records)
    return {"median_step_s": statistics.median(r["ms_per_step"] for r in records) / 1000}


def judged_in_place(judge, step: int, policy: torch.nn.Module) -> bool:
    """judge(step, policy) on the policy in training, in eval mode and without gradients, as
    loading.load_policy would hand it over; training goes on (in train mode) when it says so."""
    policy.eval()
    with torch.no_grad():
        go_on = judge(step, policy)
    policy.train()
    return go_on


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
    return train.step_record(cfg, step, loss, result, ms_per_step, batch, inputs)


# ----------------------------------------------------------------------------------------------
# What the experiments write


def row_differences(rows: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """{"A - B": (mean, low, high)}: paired differences in per-prompt wins of rows A and B (by
    label) over the same references and prompts, for each (A, B) of pairs."""
    by_seed = sorted(rows, key=lambda r: r["seed"])

    def wins(label: str) -> list[list[float]]:
        return [row["prompt_wins"] for row in by_seed if row["label"] == label]

    return {f"{a} - {b}": paired_difference(wins(a), wins(b)) for a, b in pairs}


def write_outputs(out: Path, name: str, table: str, figure, started: float) -> None:
    """An experiment's results: out/<name>.md (its tables) and out/<name>.svg (its picture, a
    figures.py Figure), then the tables, where both went and how long it took."""
    write_text(out / f"{name}.md", table)
    figures.save(figure, out / f"{name}.svg")
    print("\n" + table + f"\n{name}: wrote {out / f'{name}.md'} and {out / f'{name}.svg'} | "
          f"{(time.time() - started) / 60:.1f} min")
