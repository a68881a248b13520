"""The machinery every stage shares, kept out of the loops a learner reads: the device, one
checkpoint format, one resume format, one Ctrl-C guard, and batches and learning rates that are
pure functions of the step, so every training stage can stop and start again exactly.

Every file the pipeline writes with weights in it (gpt.pt, sae.pt, reference_cache.pt, policy.pt
and the <name>.resume.pt of an interrupted stage) is one dict, written by `save_checkpoint` and
read by `load_checkpoint`:

    {"kind": "gpt" | "sae" | "reference_cache" | "policy" | "resume",
     "config": the settings it was made with,
     "made_from": {input name: fingerprint} of the artifacts it was made from,
     ...: its contents (state_dict, tensors, metrics)}
"""

import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch


class UsageError(Exception):
    """A problem with the command line or the user's files: printed as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C stopped a training stage at a step boundary, after it saved its state to `saved_to`
    (a <name>.resume.pt) where it could. Exit code 130, like Ctrl-C."""

    def __init__(self, stage: str, step: int, saved_to: Path | None = None):
        saved = f"; saved {saved_to}; continue with --resume" if saved_to else ""
        super().__init__(f"{stage} interrupted at step {step}{saved}")
        self.stage, self.step, self.saved_to = stage, step, saved_to

    def __reduce__(self):
        # pickle (a child's exception sent to its parent) rebuilds it from these, not the message
        return type(self), (self.stage, self.step, self.saved_to)


# ----------------------------------------------------------------------------------------------
# The device: chosen in one place.


def pick_device(requested: str) -> torch.device:
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available[requested]:
        raise UsageError(
            f"--device {requested} was asked for, but this machine has no {requested} device"
        )
    return torch.device(requested)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; a no-op elsewhere, so CPU runs stay exact and reproducible."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def precision(device: torch.device) -> str:
    """The precision `autocast` runs the GPT in on this device; recorded with the cache."""
    return "bfloat16" if device.type == "cuda" else "float32"


def in_float32(function, tensor: torch.Tensor):
    """function(tensor) in float32, autocast off: the SAE's TopK choices, and so D(y), must not
    depend on the precision the GPT ran in."""
    with torch.autocast(tensor.device.type, enabled=False):
        return function(tensor.float())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures work and not kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------------------------
# Training loops: progress lines, non-finite losses, checkpoints and resume.


def log_line(stage: str, step: int, steps: int, started: float, **values) -> str:
    shown = " | ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in values.items()
    )
    return f"{stage} step {step:>5}/{steps} | {shown} | {time.time() - started:6.1f}s"


def check_finite(loss: torch.Tensor, stage: str, step: int, last_good: Path, cause: str) -> None:
    """A non-finite loss stops training before the update. Nothing is saved: these weights gave
    the bad loss, so the last good checkpoint (written every log_every steps) is kept as it is."""
    if not torch.isfinite(loss):
        kept = "nothing was saved"
        if last_good.exists():
            kept = (f"the last good checkpoint is {last_good} "
                    "(--resume continues it only with the same settings)")
        raise UsageError(
            f"{stage}: the loss is {loss.item()} at step {step}; training stopped; "
            f"likely cause: {cause}; {kept}"
        )


def write_atomically(path: Path, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`: a crash
    mid-write never leaves a partial file where a good one was, and a failed write (a full or
    read-only disk, a directory in the way) is one `could not write` error with no file left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):  # a read-only disk refuses the cleanup too
            tmp.unlink(missing_ok=True)
        raise UsageError(
            f"could not write {path} ({error}): free some space or pick another --out_dir"
        ) from None


def write_text(path: Path, text: str) -> None:
    """Every text file the project writes (JSON, Markdown, SVG, logs) goes through here."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2))


def read_json(path: Path, how_to_make: str):
    """A JSON file this project wrote, or one `error:` line naming it when it is missing, not
    readable, truncated or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} not found: {how_to_make}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        problem = error.strerror if isinstance(error, OSError) else type(error).__name__
        raise UsageError(
            f"{path} is not readable JSON ({problem}): delete it, then {how_to_make}"
        ) from None


def save_checkpoint(path: Path, kind: str, config: dict, made_from: dict, **contents) -> None:
    """One checkpoint dict, written atomically (write_atomically)."""
    payload = {"kind": kind, "config": config, "made_from": made_from, **contents}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, kind: str, how_to_make: str) -> dict:
    """The checkpoint at `path`, which must be of this kind and have every part of the format."""
    if not path.exists():
        raise UsageError(f"{path} not found: {how_to_make}")
    try:
        # weights_only: tensors, dicts, lists, numbers and strings only, so a file someone shared
        # can run no code here (a pickled object is refused as unreadable).
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign or code-carrying: whatever torch.load raised
        raise UsageError(
            f"{path} is not a readable checkpoint ({type(error).__name__}): "
            f"delete it, then {how_to_make or 'rerun'}"
        ) from None
    saved_kind = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
    if saved_kind != kind:
        raise UsageError(f"{path} holds a {saved_kind!r}, not a {kind!r} checkpoint")
    missing = [key for key in ("config", "made_from") if key not in payload]
    if missing:
        raise UsageError(
            f"{path} lacks {', '.join(missing)} (made by another version?): "
            f"delete it, then {how_to_make or 'rerun'}"
        )
    return payload


def restore(path: Path, how_to_make: str, build):
    """build(): a model made from a checkpoint's contents (its config and state_dict), with one
    `error:` line where they do not fit this code (a parameter renamed by another version)."""
    try:
        return build()
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise UsageError(
            f"{path} does not fit this code's model ({type(error).__name__}; made by another "
            f"version?): delete it, then {how_to_make or 'rerun'}"
        ) from None


@torch.no_grad()
def check_finite_model(model: torch.nn.Module, stage: str, cause: str, probe: torch.Tensor) -> None:
    """Refuse to save a model whose weights, or whose outputs on `probe` (its last batch), are
    not finite: an update after the last finite loss can still break them (a learning rate far
    too high), and the next stage would train on them and blame its own flags."""
    broken = [name for name, tensor in model.state_dict().items() if not tensor.isfinite().all()]
    outputs = [output for output in model(probe) if output is not None]
    if not broken and not all(output.isfinite().all() for output in outputs):
        broken = ["its outputs on the last batch"]
    if broken:
        raise UsageError(
            f"{stage}: the weights are not finite after training ({', '.join(broken[:3])}); "
            f"likely cause: {cause}; the stage's output was not saved"
        )


def fingerprint(*parts) -> str:
    """A short sha256 of its parts.

    Parts may be tensors, dicts of tensors (state dicts), lists, strings and JSON-able values.
    Used to tie a reference cache to the exact reference weights, SAE weights, data and config.
    """
    digest = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest.update(str(key).encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            digest.update(f"[{len(obj)}".encode())
            for item in obj:
                feed(item)
        else:
            digest.update(json.dumps(obj, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()[:16]


def changed_inputs(payload: dict, expected: dict) -> list[str]:
    """The inputs whose fingerprint in the artifact's made_from is not this run's (`expected`)."""
    return [name for name, value in expected.items() if payload["made_from"].get(name) != value]


def check_made_from(path: Path, payload: dict, expected: dict, how_to_make: str) -> None:
    """Refuse an artifact made from other inputs than this run's (changed_inputs)."""
    changed = changed_inputs(payload, expected)
    if changed:
        raise UsageError(
            f"{path} was made from another {' and '.join(changed)} than this run's: {how_to_make}"
        )


def changed_settings(saved: dict, asked: dict) -> str:
    """The settings that differ between a saved file's config and this run's, as flags with the
    saved value (and this run's): "--beta 1.0 (now 2.0), ..."; empty when none differ."""
    differ = sorted(key for key in asked.keys() | saved.keys() if asked.get(key) != saved.get(key))
    return ", ".join(f"--{key} {saved.get(key)!r} (now {asked.get(key)!r})" for key in differ)


def save_resume(path: Path, config: dict, step: int, state: dict) -> None:
    """The resume format of every stage: the settings, the step to start from, and the state."""
    save_checkpoint(path, "resume", config, {}, step=step, state=state)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a resume file of the GPT's stages holds: the weights and the optimizer's moments."""
    return {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}


def resume_training(
    path: Path,
    stage: str,
    config: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[int, dict]:
    """Load an interrupted stage's training_state into model and optimizer. Returns the step to
    start from (0 when there is nothing to resume) and the saved state, for what else it holds.
    Refuses a state saved with settings other than `config`: it would mix two runs into one."""
    if not path.exists():
        print(f"{stage}: nothing to resume ({path} not found); starting from step 0")
        return 0, {}
    saved = load_checkpoint(path, "resume", "")
    shown = changed_settings(saved["config"], config)
    if shown:
        raise UsageError(
            f"--resume: {path} was saved with {shown}; "
            "rerun with those settings, or delete it to start over"
        )
    print(f"{stage}: resuming from step {saved['step']} ({path})")
    try:
        model.load_state_dict(saved["state"]["state_dict"])
    except RuntimeError:  # missing keys or other shapes: the weights of another model config
        raise UsageError(
            f"--resume: {path} holds a model of another config; "
            "delete it, or rerun with the settings it was saved with"
        ) from None
    optimizer.load_state_dict(saved["state"]["optimizer"])
    return saved["step"], saved["state"]


@contextlib.contextmanager
def stop_at_step_boundary():
    """While active, Ctrl-C only sets the yielded Event; each training loop checks it between steps,
    so an interrupt never lands halfway through an update (off the main thread, Python delivers no
    SIGINT, and the guard does nothing)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: requested.set())
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The random stream of one step (or one sampling call): a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Which of n items step `step` trains on, drawn with replacement from step_generator, so a
    resumed run draws exactly the batches an uninterrupted one would. Shape: (batch_size,), CPU."""
    return torch.randint(n, (batch_size,), generator=step_generator(seed, step))


def learning_rate(step: int, peak: float, warmup: int, total: int, decay: str) -> float:
    """Linear warm-up over `warmup` steps, then one of: "constant"; "cosine", from peak down to
    peak/10 at the last step; "linear_tail", constant, then to 0 over the last 20% of the steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    decay_start = int(0.8 * total)
    if decay == "linear_tail" and step >= decay_start:
        return peak * (total - step) / (total - decay_start)
    return peak


@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """One run per --out_dir at a time: out_dir/.lock holds the running process's id while it
    runs. A second run stops with one `error:` line naming that process; a lock left by a process
    that is gone (killed, crashed) is taken over."""
    path = Path(out_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if path.exists() and not path.is_file():  # a directory or a FIFO: reading would fail
                raise UsageError(f"{path} is not a lock file: remove it (rm -r {path}), then rerun")
            try:
                holder = path.read_text().strip()
                just_made = time.time() - path.stat().st_mtime < 5  # its pid may be unwritten
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if (holder.isdigit() and process_is_alive(int(holder))) or (not holder and just_made):
                who = f"process {holder}" if holder else "a run that is starting"
                raise UsageError(
                    f"--out_dir {out_dir!r} is in use by {who} (its {path}): wait for it to "
                    "finish, or pick another --out_dir"
                ) from None
            print(f"lock: taking over {path}, left by process {holder or '?'} that is gone")
            path.unlink(missing_ok=True)
    with os.fdopen(descriptor, "w") as lock_file:
        lock_file.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, only checks that the process exists
    except OSError as error:  # PermissionError: it exists, under another user
        return not isinstance(error, ProcessLookupError)
    return True


# With --resume, `--stage all` skips the finished stages: <name>.pt saved, no <name>.resume.pt.
STAGE_FILES = {"pretrain": "gpt", "sae": "sae", "cache": "reference_cache", "prefer": "policy"}


def stages_to_run(stage: str, all_stages: tuple, out_dir: str, resume: bool) -> list[str]:
    """The stages of this command. `--stage all --resume` starts at the first stage that is
    unfinished (interrupted or never run); every stage after it runs too, as its inputs change."""
    if stage != "all":
        return [stage]
    stages, out = list(all_stages), Path(out_dir)
    while resume and stages[0] in STAGE_FILES:
        name = STAGE_FILES[stages[0]]
        if not (out / f"{name}.pt").exists() or (out / f"{name}.resume.pt").exists():
            break
        print(f"{stages[0]}: finished earlier ({out / name}.pt); skipped (--resume)")
        stages.pop(0)
    return stages
