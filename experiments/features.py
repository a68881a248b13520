"""What the SAE's latents mean: for each, the held-out response tokens that activate it most.

    python -m experiments.features --out_dir out                  the 8 latents FPO constrains most
    python -m experiments.features --out_dir out --latents 3,17   these latents

It reads a finished `python train.py` run (gpt.pt, sae.pt, reference_cache.pt in --out_dir) and
writes out_dir/features.txt (docs/sae.md quotes the default run's).
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

import data
import train
from config import Config, parse_args, run_command
from loading import load_gpt
from runtime import UsageError, write_text
from sae import eval_mode, ids_and_mask


@dataclass
class LatentsConfig:
    latents: str = ""  # latents to show (3,17); empty: the 8 FPO's constraint uses most


@dataclass
class FeaturesConfig(Config):
    features: LatentsConfig = field(default_factory=LatentsConfig)


def most_constrained_latents(cache: dict, fpo_k: int, n: int) -> list[int]:
    """The latents most often among the reference's top-fpo_k pooled features (half of the union
    I(y) in D(y)), counted over every cached response."""
    counts = Counter()
    offsets = cache["feature_offsets"]
    indices = cache["feature_indices"]
    values = cache["feature_values"]
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        top = values[start:end].topk(min(fpo_k, end - start)).indices
        counts.update(indices[start:end][top].tolist())
    return [latent for latent, _ in counts.most_common(n)]


def top_activating_contexts(
    model: nn.Module,
    sae: nn.Module,
    token_batches: Iterable,
    layer: int,
    latents: list[int],
    decode_fn: Callable[[list[int]], str],
    n_examples: int = 5,
    context: int = 6,
) -> str:
    """For each latent, the n_examples tokens where it is largest, with their preceding context.

    Each example shows the `context` tokens before the activating token (the model is causal, so
    later tokens cannot have caused the activation).

    Args:
        model: the GPT the SAE reads.
        sae: an SAE with `encode` and `decode`.
        token_batches: ids (B, T) or (ids, mask) pairs; only masked-in positions are candidates.
        layer: the block the SAE reads.
        latents: latent indices to report.
        decode_fn: token ids -> text (e.g. the tokenizer's decode).
        n_examples: examples per latent.
        context: tokens shown before each activating token.

    Returns:
        text, one block per latent, lines like `   3.214  'the cat [[ sat]]'` (activating token
        in [[ ]]).
    """
    device = next(model.parameters()).device
    best = {latent: [] for latent in latents}  # latent -> [(activation, context ids, token id)]
    with eval_mode(model), torch.no_grad():
        for item in token_batches:
            ids, mask = ids_and_mask(item)
            _, hidden = model(ids.to(device), hidden_layer=layer)  # (B, T, C)
            acts = sae.encode(hidden)[..., latents].cpu()  # (B, T, L)
            # masked-out positions read 0, so they are never reported (value > 0 below)
            acts = acts.masked_fill(~mask.cpu()[..., None], value=0.0)
            T = ids.shape[1]
            for j, latent in enumerate(latents):
                latent_acts = acts[..., j].flatten()  # (B * T,)
                values, flat_positions = latent_acts.topk(min(n_examples, latent_acts.numel()))
                for value, flat in zip(values.tolist(), flat_positions.tolist()):
                    row, pos = divmod(flat, T)
                    if value > 0:
                        context_ids = ids[row, max(0, pos - context):pos].tolist()
                        best[latent].append((value, context_ids, int(ids[row, pos])))
                best[latent] = sorted(best[latent], key=lambda example: -example[0])[:n_examples]
    lines = []
    for latent in latents:
        never = "" if best[latent] else " never active on these tokens"
        lines.append(f"latent {latent}:" + never)
        for value, context_ids, token_id in best[latent]:
            shown = decode_fn(context_ids) + "[[" + decode_fn([token_id]) + "]]"
            lines.append(f"  {value:8.3f}  {shown!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cfg = parse_args(argv, __doc__.split("\n\n")[0], "-m experiments.features", FeaturesConfig)
    text = cfg.features.latents
    if not all(part.isdigit() for part in text.split(",")) and text:
        raise UsageError(f"--latents {text!r}: must be comma-separated latent numbers, e.g. 3,17")
    device = train.start_run(cfg)
    print("\n== features ==")
    model, gpt_fingerprint = load_gpt(cfg, device)
    inputs = train.load_preference_inputs(cfg, model, gpt_fingerprint, device)
    latents = [int(latent) for latent in text.split(",")] if text else []
    if any(latent >= inputs.sae.d_sae for latent in latents):
        raise UsageError(f"--latents {text!r}: each must be below the SAE's {inputs.sae.d_sae}")
    if not latents:
        latents = most_constrained_latents(inputs.cache, cfg.prefer.fpo_k, n=8)
        print(f"features: the {len(latents)} latents most often in the reference's "
              f"top-{cfg.prefer.fpo_k} pooled features")
    eos = data.eos_id(inputs.enc)
    batches = (
        (input_ids, mask)
        for _, input_ids, mask in data.every_pair(inputs.test_pairs, 64, 0, eos, device)
    )
    report_text = top_activating_contexts(
        model, inputs.sae, batches, cfg.sae.sae_layer, latents, inputs.enc.decode
    )
    path = Path(cfg.run.out_dir) / "features.txt"
    write_text(path, report_text + "\n")
    print(f"{report_text}\nfeatures: wrote {path}")


if __name__ == "__main__":
    run_command(main)
