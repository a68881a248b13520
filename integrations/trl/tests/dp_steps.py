"""A few FPO steps through train_fpo.py's trainer, recording each step's loss and gradient.

    python tests/dp_steps.py OUT.pt TRAIN_FPO_FLAGS...                      one process
    torchrun --nproc_per_node 2 tests/dp_steps.py OUT.pt TRAIN_FPO_FLAGS...  DDP, gloo on the CPU

Process 0 saves {"processes", "losses", "feature_mse", "grads"} to OUT.pt: how many processes
trained and, per optimizer step, the loss averaged over them, the mean D(y_l), and the flattened
gradient after DDP's all-reduce.
"""

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # integrations/trl

import train_fpo  # noqa: E402


class StepRecorder(TrainerCallback):
    """Each optimizer step's gradient, flattened, as the optimizer is about to apply it."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())


def main(argv: list[str]) -> None:
    out, flags = argv[0], argv[1:]
    torch.set_num_threads(1)
    recorder = StepRecorder()
    args = train_fpo.build_parser().parse_args(flags)
    trainer = train_fpo.build_trainer(args, callbacks=[recorder])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        torch.save({"processes": trainer.accelerator.num_processes,
                    "losses": [entry["loss"] for entry in logs],
                    "feature_mse": [entry["feature_mse/rejected"] for entry in logs],
                    "grads": recorder.grads}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
