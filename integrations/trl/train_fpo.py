"""Train a Hugging Face causal LM with FPO on a JSONL of {"prompt", "chosen", "rejected"} pairs.

    python train_fpo.py --model out/demo/model --sae out/demo/sae.pt --data out/demo/pairs.jsonl \
        --output_dir out/demo/fpo

Several processes (DDP): `accelerate launch --multi_gpu --num_processes N train_fpo.py ...`.
The reference terms are computed once, before the first step, with the loaded model itself;
training then holds no reference model. The trained model and tokenizer are saved to
--output_dir, with trainer_state.json (the logged metrics) and fpo_run.json (the flags, and
reward metrics before and after training when --eval_data is given). Bad input stops with one
line "error: ..." and exit code 2.
"""

import argparse
import json
import math
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
try:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # fpo_trainer puts the repository root on sys.path: import it before data, runtime, sae.
    from fpo_trainer import FPOConfig, FPOTrainer, NonFiniteLoss
    from gemma_scope import load_jumprelu_npz
    import data
    from runtime import UsageError, check_finite_model, load_checkpoint
    from sae import load_sae
except ModuleNotFoundError as missing:  # the integration's own packages, beyond the core's
    if __name__ != "__main__":
        raise
    print(f"error: the package {missing.name!r} is not installed: pip install -r {REQUIREMENTS}",
          file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="a local Hugging Face model folder or a cached Hub id")
    add("--sae", required=True, help="a Gemma Scope params.npz (JumpReLU) or this project's "
                                     "sae.pt (TopK)")
    add("--layer", type=int, default=-1, help="block whose output the SAE reads; -1 = last")
    add("--data", required=True, help="training pairs, JSONL")
    add("--eval_data", help="pairs to measure reward metrics on before and after training, JSONL")
    add("--beta", type=float, default=0.1, help="beta: scale of the log-prob terms and of D(y)")
    add("--alpha", type=float, default=0.5, help="alpha: weight of the feature constraint")
    add("--fpo_top_k", type=int, default=50, help="k of D(y): activated features per side "
                                                  "(not the SAE's own TopK k)")
    add("--lr", type=float, default=5e-7, help="peak learning rate (AdamW)")
    add("--warmup_steps", type=int, default=0, help="linear warm-up steps, then linear decay")
    add("--batch_size", type=int, default=4, help="pairs per process per forward")
    add("--grad_accum", type=int, default=1, help="forwards per optimizer step")
    add("--steps", type=int, default=100, help="optimizer steps")
    add("--max_length", type=int, default=1024, help="tokens kept of prompt + response")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    add("--log_every", type=int, default=10, help="steps between metric lines")
    add("--seed", type=int, default=0, help="fixes the batch order")
    add("--cpu", action="store_true", help="train on the CPU even where a GPU is available")
    add("--output_dir", required=True, help="where the trained model and fpo_run.json go")
    return parser


def load_pairs(path: str) -> Dataset:
    """The pairs of a JSONL file as a Dataset; raises data.DataError naming a bad line."""
    pairs, _ = data.load_preferences(path)
    return Dataset.from_list([asdict(pair) for pair in pairs])


def load_model(name: str):
    """The model (float32 weights; bf16 autocast on a GPU) and its tokenizer."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UsageError(f"--model {name}: cannot load it ({first_line})") from None
    except (RuntimeError, ValueError) as error:  # weights of other shapes than config.json's
        first_line = str(error).strip().splitlines()[0]
        raise UsageError(f"--model {name}: its weights do not fit its config.json, or the config "
                         f"no model ({first_line})") from None
    return model, tokenizer


def load_sae_file(path: str, layer: int, n_layers: int) -> torch.nn.Module:
    """The SAE: a Gemma Scope params.npz, or a sae.pt whose recorded layer must be `layer`."""
    if path.endswith(".npz"):
        try:
            return load_jumprelu_npz(path)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise UsageError(f"--sae {path}: {error}") from None
    checkpoint = load_checkpoint(Path(path), "sae", "make one with make_demo.py or train.py")
    saved_layer = checkpoint["made_from"].get("layer")
    if saved_layer is not None and saved_layer != layer % n_layers:
        raise UsageError(f"--sae {path} was trained on block {saved_layer}, not --layer {layer}")
    return load_sae(checkpoint)


def build_trainer(args: argparse.Namespace, callbacks=None) -> FPOTrainer:
    """Everything the flags name, loaded and checked, and the trainer (its cache built)."""
    for flag in ("steps", "batch_size", "grad_accum", "max_length", "log_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    # as train.py's flags: a NaN or infinite value would train on to non-finite weights
    for flag, least in (("lr", 0), ("beta", 0), ("alpha", None), ("max_grad_norm", None)):
        value = getattr(args, flag)
        if not math.isfinite(value) or (least is not None and value <= least):
            raise UsageError(f"--{flag} must be a finite number"
                             f"{'' if least is None else ' > 0'}, got {value}")
    train_pairs = load_pairs(args.data)
    eval_pairs = load_pairs(args.eval_data) if args.eval_data else None
    model, tokenizer = load_model(args.model)
    n_layers = model.config.get_text_config().num_hidden_layers
    if not -n_layers <= args.layer < n_layers:
        raise UsageError(f"--layer {args.layer} is out of range: the model has {n_layers} blocks")
    sae = load_sae_file(args.sae, args.layer, n_layers)
    d_model = model.config.get_text_config().hidden_size
    if sae.d_model != d_model:
        raise UsageError(f"--sae reads {sae.d_model}-wide vectors; the model's are {d_model}")
    try:
        config = FPOConfig(
            output_dir=args.output_dir,
            beta=args.beta,
            fpo_alpha=args.alpha,
            fpo_top_k=args.fpo_top_k,
            fpo_layer=args.layer,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=args.warmup_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps,
            max_length=args.max_length,
            max_grad_norm=args.max_grad_norm,
            logging_steps=args.log_every,
            seed=args.seed,
            use_cpu=args.cpu,
            bf16=torch.cuda.is_available() and not args.cpu,
            dataloader_pin_memory=torch.cuda.is_available() and not args.cpu,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        return FPOTrainer(model, sae, config, train_dataset=train_pairs,
                          processing_class=tokenizer, eval_dataset=eval_pairs, callbacks=callbacks)
    except ValueError as error:  # the trainer's checks: no pair left once tokenized, ...
        raise UsageError(str(error).replace("max_length", "--max_length")) from None


class LogitsOnly(torch.nn.Module):
    """A Hugging Face model as runtime.check_finite_model reads one: its outputs on a batch of
    token ids, a tuple of tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids).logits,)


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    trainer = build_trainer(args)
    run = {"flags": vars(args)}
    if args.eval_data:
        run["before"] = trainer.evaluate()
    try:
        trainer.train()
    except NonFiniteLoss as error:  # as train.py: stop there, save nothing
        raise UsageError(f"{error}; training stopped; likely cause: --lr or --beta too high; "
                         "nothing was saved") from None
    # An update after the last finite loss can still break the weights: save none of those.
    probe = torch.tensor([[trainer.processing_class.eos_token_id or 0]])  # one token
    check_finite_model(LogitsOnly(trainer.model), "fpo", "--lr or --beta too high",
                       probe.to(trainer.model.device))
    if args.eval_data:
        run["after"] = trainer.evaluate()
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history
    if trainer.is_world_process_zero():
        (Path(args.output_dir) / "fpo_run.json").write_text(json.dumps(run, indent=2))
        print(f"fpo: saved the model and fpo_run.json to {args.output_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UsageError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
