"""--bench: the median training-step time of each method on identical batches, and the peak
memory of each method's training loop alone, measured in a fresh process (docs/cost.md).

The memory meter: on CUDA, max allocated above what was allocated on entering the loop; on the
CPU and MPS, LiveTensorBytes counts every tensor storage the loop allocates while it lives.
"""

import dataclasses
import re
import resource
import statistics
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
from config import Config, stage_settings
from experiments.common import (
    compare_tag, frozen_reference, inputs_made_from, reference_run, timed_step, train_in_child,
    train_policy, with_method,
)
from experiments.compare import COMPARE_ROWS
from experiments.settings import LabConfig
from model import GPT
from runtime import batch_indices, write_json, write_text


class LiveTensorBytes(TorchDispatchMode):
    """While active, the bytes of every tensor storage an op allocates, until it is freed: `peak`
    is the most that was live at once, counting nothing allocated before (weights, data, cache).
    Outputs that alias an input (views, in-place updates) allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if id(storage) in self.tracked or storage.data_ptr() in inputs:
                continue
            self.tracked.add(id(storage))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            # runs when the storage is freed
            weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes


class LoopPeakMemory:
    """Around a training loop (common.train_policy's `measure`), two peaks in MB:
    - `loop_mb`, the loop's own: on CUDA max allocated above what was allocated on entering; on
      the CPU and MPS the peak of live tensor bytes allocated inside the loop (LiveTensorBytes);
    - `rss_mb`, the whole process's peak resident set size (since entering on Linux, over its
      lifetime elsewhere): torch, data and cache included, which every method holds alike."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loop_mb = float("nan")
        self.rss_mb = float("nan")
        self.tensors = LiveTensorBytes()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_before = torch.cuda.memory_allocated(self.device)
        else:
            self.tensors.__enter__()
        if Path("/proc/self/clear_refs").exists():
            # a switch of the kernel's, not a file of ours: written in place, never renamed over
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.loop_mb = (peak - self.allocated_before) / 2**20
        else:
            self.tensors.__exit__(*exc)
            self.loop_mb = self.tensors.peak / 2**20
        status = Path("/proc/self/status")
        if status.exists():
            peak_kb = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)
            self.rss_mb = int(peak_kb) / 2**10
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # bytes on macOS, KiB elsewhere
            self.rss_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
        return False


def train_and_measure(cfg: Config, device, seed: int, tag: str) -> dict:
    """One policy trained (common.train_policy), with its median step time and its loop's peak
    memory."""
    memory = LoopPeakMemory(device)
    cost = train_policy(cfg, device, seed, tag, measure=memory)
    return cost | {"loop_memory_mb": memory.loop_mb, "peak_rss_mb": memory.rss_mb}


def bench(cfg: LabConfig, device) -> None:
    """Median training-step time of each method on identical batches, interleaved A B C A B C so
    drift in machine speed hits every method alike; then each method's training-loop memory,
    measured in a fresh process that loads only what that method needs. The GPT size flags pick
    the model (a short --pretrain_steps is enough for timing). It runs on the reference of
    --seed, shared with the other experiments."""
    out = Path(cfg.run.out_dir)
    cfg = reference_run(cfg, cfg.run.seed, device)
    print(f"\n== bench: {cfg.experiment.bench_steps} interleaved steps per method ==")
    reference, inputs = frozen_reference(cfg, device)
    method_cfgs = {label: with_method(cfg, overrides) for label, overrides in COMPARE_ROWS.items()}
    policies = {label: GPT(reference.config).to(device) for label in method_cfgs}
    optimizers = {}
    for label, policy in policies.items():
        policy.load_state_dict(reference.state_dict())
        optimizers[label] = torch.optim.AdamW(
            policy.parameters(), lr=method_cfgs[label].prefer.pref_lr, weight_decay=0.0
        )
    n_warmup = 3
    eos = data.eos_id(inputs.enc)
    never_saved = out / "bench.resume.pt"  # what a non-finite loss names: nothing was saved
    step_ms = {label: [] for label in method_cfgs}
    for step in range(n_warmup + cfg.experiment.bench_steps):
        picks = batch_indices(
            len(inputs.train_pairs), cfg.prefer.pref_batch_size, cfg.run.seed, step
        )
        batch = data.pair_batch(inputs.train_pairs, picks, row_offset=0, eos_id=eos, device=device)
        for label, method_cfg in method_cfgs.items():
            # train_preference's step: ms_per_step times it up to the update, and the baselines'
            # D(y) is measured after it
            record = timed_step(
                method_cfg, policies[label], optimizers[label], reference, inputs, batch, step,
                last_good=never_saved,
            )
            if step >= n_warmup:
                step_ms[label].append(record["ms_per_step"])
    results = {
        label: {"median_step_ms": statistics.median(times)} for label, times in step_ms.items()
    }
    # train_policy never resumes: a loop resumed with its optimizer's moments already loaded
    # would not count their memory.
    for label, overrides in COMPARE_ROWS.items():
        memory_cfg = with_method(cfg, overrides | {"pref_steps": n_warmup + 2})
        tag = "bench_" + compare_tag(label, cfg.run.seed)
        results[label] |= train_in_child(
            tag, "rerun --bench", train_and_measure, memory_cfg, device, cfg.run.seed, tag
        )
    ratios = {
        f"FPO/{other} {measure}": results["FPO"][key] / results[other][key]
        for measure, key in (("time", "median_step_ms"), ("loop memory", "loop_memory_mb"))
        for other in ("SimPO", "DPO", "TDPO-2")
    }
    pretrain_cfg = cfg.pretrain
    n_parameters = sum(p.numel() for p in reference.parameters())
    memory_kind = "max allocated" if device.type == "cuda" else "live tensors"
    lines = [
        f"GPT {pretrain_cfg.n_layer} x {pretrain_cfg.n_embd}, {n_parameters:,} parameters; "
        f"SAE {inputs.sae.d_sae} latents; {device}\n",
        f"| method | median ms/step | loop memory MB ({memory_kind}) | peak RSS MB |",
        "|---|---|---|---|",
    ]
    for label, values in results.items():
        lines.append(f"| {label} | {values['median_step_ms']:.1f} | "
                     f"{values['loop_memory_mb']:.1f} | {values['peak_rss_mb']:.0f} |")
    lines.append("\n" + " | ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
    bench_md = "\n".join(lines) + "\n"
    print("\n" + bench_md)
    write_text(out / "bench.md", bench_md)
    path = out / "bench.json"
    # Nothing is judged here, so the judging settings are not part of it.
    made_from = inputs_made_from(cfg, device) | {
        "settings": {
            label: stage_settings(method_cfg, "prefer") for label, method_cfg in method_cfgs.items()
        }
    }
    bench_json = {
        "device": str(device),
        "steps": cfg.experiment.bench_steps,
        "gpt": dataclasses.asdict(pretrain_cfg),
        "d_sae": inputs.sae.d_sae,
        "methods": results,
        "ratios": ratios,
        "made_from": made_from,
    }
    write_json(path, bench_json)
    print(f"bench: wrote {out / 'bench.md'} and {path}")
