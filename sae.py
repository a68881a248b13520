"""Sparse autoencoders on a GPT's residual stream, the feature space FPO constrains.

`SparseAutoencoder` is a TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"),
trained here by `train_sae` on activations collected by `harvest_activations`. It takes raw
residual-stream vectors, is saved as the dict `sae.checkpoint()` and is rebuilt by
`load_sae(checkpoint)`. (Gemma Scope's JumpReLU SAEs are read by integrations/trl/gemma_scope.py.)
Quality metrics (FVU, L0, CE loss recovered, dead latents, density histogram) are bundled by
`evaluate_sae`.
"""

import contextlib
import math
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import (
    Interrupted, batch_indices, learning_rate, resume_training, save_resume, stop_at_step_boundary,
    training_state,
)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, ReLU them, zero the rest.

    pre (..., d_sae) -> codes with at most k non-zeros per row (..., d_sae).
    """
    values, indices = pre.topk(k, dim=-1, sorted=False)  # (..., k)
    return torch.zeros_like(pre).scatter(dim=-1, index=indices, src=F.relu(values))


class SparseAutoencoder(nn.Module):
    """TopK sparse autoencoder that reads raw residual-stream vectors.

    For a raw vector x (d_model):
        x'     = s * x                         s: fixed scale, E||x'||^2 = d_model on training data
        pre    = (x' - b_dec) @ W_enc + b_enc  (d_sae)
        z      = ReLU(TopK_k(pre))             codes: the k largest pre-activations, the rest zero
        x_hat' = z @ W_dec + b_dec             row W_dec[i] is latent i's direction, at unit norm
        x_hat  = x_hat' / s
    s is the buffer `input_scale`: encode multiplies by it and decode divides by it, so callers
    never see the scaled space, only the codes z live in it (a latent's value is its contribution
    in units where a typical coordinate of x' has mean square 1).
    """

    def __init__(self, d_model: int, d_sae: int, k: int):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"need 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        self.W_enc = nn.Parameter(torch.zeros(d_model, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("input_scale", torch.ones(()))

    @property
    def config(self) -> dict:
        """The shape of this SAE: what `load_sae` needs besides the state_dict."""
        return {"kind": "topk", "d_model": self.d_model, "d_sae": self.d_sae, "k": self.k}

    def checkpoint(self) -> dict:
        """{"sae_config", "state_dict"}: what `load_sae` reads back (extra keys are ignored)."""
        return {"sae_config": self.config, "state_dict": self.state_dict()}

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """pre = (s x - b_dec) @ W_enc + b_enc, before TopK: x (..., d_model) -> (..., d_sae)."""
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes z = ReLU(TopK_k(pre)). x (..., d_model) -> z (..., d_sae)."""
        return topk_relu(self.pre_activations(x), self.k)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes z in sparse form: the values and latents of the k largest pre-activations.

        x (..., d_model) -> values (..., sae_k), ReLU'd so some may be 0, and indices (..., sae_k)
        (sae_k = self.k): zeros(d_sae).scatter(-1, indices, values) == encode(x) exactly.
        """
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)  # (..., sae_k)
        return F.relu(values), indices

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x_hat = (z @ W_dec + b_dec) / s, raw scale: codes z (..., d_sae) -> (..., d_model)."""
        return (codes @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, then decode; no side effects.

        x (..., d_model) -> (x_hat (..., d_model), codes z (..., d_sae)).
        """
        codes = self.encode(x)
        return self.decode(codes), codes

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every latent direction W_dec[i] to unit norm (after each optimizer step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each row's gradient along that (unit) row, before the optimizer step.

        That component only changes a direction's norm, which normalize_decoder undoes anyway; left
        in, it would still feed Adam's moment estimates.
        """
        along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)  # (d_sae, 1)
        self.W_dec.grad -= along * self.W_dec


def load_sae(checkpoint: dict) -> SparseAutoencoder:
    """Rebuild the SAE from a dict holding its `checkpoint()` (e.g. from torch.load)."""
    config, state_dict = checkpoint["sae_config"], checkpoint["state_dict"]
    if config["kind"] != "topk":
        raise ValueError(f"unknown SAE kind {config['kind']!r}; expected 'topk'")
    sae = SparseAutoencoder(config["d_model"], config["d_sae"], config["k"])
    sae.load_state_dict(state_dict)
    return sae


# --------------------------------------------------------------------------- training


def normalized_mse(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """sum ||target - prediction||^2 / sum ||target - mean(target)||^2, a differentiable scalar.

    target (..., d), prediction (..., d).
    """
    d = target.shape[-1]
    target = target.reshape(-1, d)  # (N, d)
    prediction = prediction.reshape(-1, d)  # (N, d)
    return (target - prediction).pow(2).sum() / (target - target.mean(dim=0)).pow(2).sum()


def auxk_loss(
    pre: torch.Tensor,
    dead: torch.Tensor,
    residual: torch.Tensor,
    W_dec: torch.Tensor,
    input_scale: torch.Tensor,
    aux_k: int,
) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024, section A.2): dead latents reconstruct the main error.

    The top aux_k DEAD latents reconstruct the main reconstruction's error e = x - x_hat, which
    gives dead latents a gradient they never get from TopK.

    Args:
        pre: pre-activations of the batch. Shape: (B, d_sae).
        dead: which latents count as dead. Shape: (d_sae,).
        residual: x - x_hat, detached, raw scale. Shape: (B, d_model).
        W_dec: latent directions. Shape: (d_sae, d_model).
        input_scale: the SAE's input scale s. Shape: ().
        aux_k: dead latents used per token (fewer if fewer are dead).

    Returns:
        ||e - e_hat||^2 normalised by the variance of e (a scalar; 0 when nothing is dead).
    """
    n_used = min(aux_k, int(dead.sum()))
    if n_used == 0:
        return pre.new_zeros(())
    aux_codes = topk_relu(pre[:, dead], n_used)  # (B, n_dead)
    # (B, d_model); no b_dec: e has no offset to model
    residual_hat = aux_codes @ W_dec[dead] / input_scale
    return normalized_mse(residual, residual_hat)


def update_tokens_since_fired(
    tokens_since_fired: torch.Tensor,
    codes: torch.Tensor,
) -> torch.Tensor:
    """Dead-latent bookkeeping: reset the latents that fired in this batch, add B to the rest.

    tokens_since_fired, the tokens seen since each latent last fired (d_sae,), and the batch's
    codes (B, d_sae) -> the updated counts (d_sae,).
    """
    fired = (codes > 0).any(dim=0)  # (d_sae,)
    return torch.where(fired, 0, tokens_since_fired + codes.shape[0])


def geometric_median(points: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The geometric median of points (N, d), by `iterations` Weiszfeld updates from the mean.

    Each iteration: m <- sum_i w_i p_i / sum_i w_i with w_i = 1 / ||p_i - m||. The result (d,)
    minimises the summed distance to all points (robust to outliers, unlike the mean).
    """
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)  # (N,)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


def initialize_sae(activations: torch.Tensor, d_sae: int, k: int, seed: int) -> SparseAutoencoder:
    """A TopK SAE initialised from activations, raw residual-stream vectors (N, d_model).

    - input_scale s = sqrt(d_model / mean ||x||^2), so the scaled data has E||x'||^2 = d_model;
    - b_dec = geometric median of (up to 16,384 sampled) scaled activations;
    - W_dec rows random unit vectors, W_enc = W_dec^T, b_enc = 0.
    """
    generator = torch.Generator().manual_seed(seed)
    d_model = activations.shape[1]
    sae = SparseAutoencoder(d_model, d_sae, k).to(activations.device)
    sample_ids = torch.randperm(len(activations), generator=generator)[:16_384]
    sample = activations[sample_ids.to(activations.device)]  # (<= 16,384, d_model)
    scale = math.sqrt(d_model / activations.float().pow(2).sum(dim=1).mean().item())
    directions = torch.randn(d_sae, d_model, generator=generator).to(activations.device)
    directions /= directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.input_scale.fill_(scale)
        sae.b_dec.copy_(geometric_median(sample.float() * scale))
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
    return sae


def train_sae(
    activations: torch.Tensor,
    d_sae: int = 256,
    k: int = 16,
    *,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 2e-3,
    warmup_steps: int = 100,
    seed: int = 0,
    aux_k: int = 256,
    aux_coef: float = 1 / 32,
    dead_tokens: int = 50_000,
    log_every: int = 500,
    resume_path: Path | None = None,
    settings: dict | None = None,
    resume: bool = False,
) -> SparseAutoencoder:
    """Train a TopK SAE on raw activations with Adam.

    Each step: loss = FVU(x, x_hat) + aux_coef * AuxK, with AuxK over the top aux_k latents that
    have not fired for dead_tokens tokens, reconstructing the residual x - x_hat (detached); then
    remove_parallel_grads, Adam step, normalize_decoder, and the dead-latent counters. Batches are
    sampled with replacement by batch_indices(seed, step).
    Resumes like every training stage: on Ctrl-C the state is saved to resume_path with
    `settings` (runtime.save_resume) and Interrupted is raised; `resume` continues from that file,
    ending with exactly the SAE an uninterrupted run gives (bit-identical on the CPU).

    Args:
        activations: raw residual-stream vectors; training uses their device. Shape: (N, d_model).
        d_sae: number of latents.
        k: latents active per token.
        steps, batch_size, lr, warmup_steps: optimisation (learning_rate's "linear_tail" schedule).
        seed: fixes the initialisation and every batch.
        aux_k, aux_coef: AuxK's dead latents per token and loss weight (1/32 as in Gao et al.).
        dead_tokens: a latent that has not fired for this many training tokens counts as dead.
        log_every: steps between progress lines.
        resume_path, settings: where Ctrl-C saves the state, and the settings saved with it
            (None: Ctrl-C stops without saving).
        resume: continue from resume_path (refused if saved with other settings).
    """
    device = activations.device
    sae = initialize_sae(activations, d_sae, k, seed)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    start_step = 0
    if resume:
        start_step, state = resume_training(resume_path, "sae", settings, sae, optimizer)
        if start_step:
            tokens_since_fired = state["tokens_since_fired"].to(device)
    started = time.time()
    fvu_sum, aux_sum, logged_steps = 0.0, 0.0, 0
    with stop_at_step_boundary() as stop:
        for step in range(start_step, steps):
            if stop.is_set():  # Ctrl-C: save, and say how to continue
                if resume_path is not None:
                    state = training_state(sae, optimizer) | {
                        "tokens_since_fired": tokens_since_fired
                    }
                    save_resume(resume_path, settings, step, state)
                raise Interrupted("sae", step, saved_to=resume_path)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr, warmup_steps, steps, decay="linear_tail")
            batch = batch_indices(len(activations), batch_size, seed, step)  # (B,)
            x = activations[batch.to(device)]  # (B, d_model)
            pre = sae.pre_activations(x)  # (B, d_sae)
            codes = topk_relu(pre, k)  # (B, d_sae)
            x_hat = sae.decode(codes)  # (B, d_model)
            fvu = normalized_mse(x, x_hat)
            dead = tokens_since_fired >= dead_tokens  # (d_sae,)
            # AuxK reconstructs the main error e = x - x_hat, not x (Gao et al. 2024, A.2)
            aux = auxk_loss(pre, dead, residual=(x - x_hat).detach(), W_dec=sae.W_dec,
                            input_scale=sae.input_scale, aux_k=aux_k)
            loss = fvu + aux_coef * aux
            # stop before the update: the weights so far stay finite
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grads()
            optimizer.step()
            sae.normalize_decoder()
            tokens_since_fired = update_tokens_since_fired(tokens_since_fired, codes)
            # log the means since the last line
            fvu_sum += fvu.item()
            aux_sum += aux.item()
            logged_steps += 1
            if (step + 1) % log_every == 0 or step + 1 == steps:
                print(
                    f"sae step {step + 1}/{steps} | fvu {fvu_sum / logged_steps:.4f} | "
                    f"auxk {aux_sum / logged_steps:.4f} | "
                    f"dead {dead.float().mean().item():.3f} | "
                    f"lr {optimizer.param_groups[0]['lr']:.2e} | {time.time() - started:.1f}s",
                    flush=True,
                )
                fvu_sum, aux_sum, logged_steps = 0.0, 0.0, 0
    return sae


# --------------------------------------------------------------------------- activations from a GPT


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, then the model's previous train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def ids_and_mask(item) -> tuple[torch.Tensor, torch.Tensor]:
    """A token batch as (ids, bool mask), the mask all True for bare ids.

    A token batch is ids (B, T), or a pair (ids (B, T), mask (B, T)) whose mask marks the
    positions to use (e.g. not padding).
    """
    if isinstance(item, (tuple, list)):
        ids, mask = item
        return ids, mask.bool()
    return item, torch.ones_like(item, dtype=torch.bool)


def harvest_activations(
    model: nn.Module,
    token_batches: Iterable,
    layer: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Collect the residual stream after block `layer` at every used position, on the CPU.

    Args:
        model: a GPT; runs in eval mode without gradients, on its own device.
        token_batches: ids (B, T) or (ids (B, T), mask (B, T)) pairs; see ids_and_mask.
        layer: block whose output is read (-1 = last).
        max_tokens: stop after this many vectors (None: use every batch).

    Returns:
        activations, float32, each batch moved to the CPU as it is produced.
        Shape: (N, d_model), N <= max_tokens.
    """
    device = next(model.parameters()).device
    max_tokens = math.inf if max_tokens is None else max_tokens
    chunks, n_tokens = [], 0
    with eval_mode(model), torch.no_grad():
        for batch_number, item in enumerate(token_batches, start=1):
            ids, mask = ids_and_mask(item)
            _, hidden = model(ids.to(device), hidden_layer=layer)  # (B, T, C)
            vectors = hidden[mask.to(device)]  # (n, C)
            chunks.append(vectors[: int(min(len(vectors), max_tokens - n_tokens))].float().cpu())
            n_tokens += len(chunks[-1])
            if batch_number % 50 == 0 or n_tokens >= max_tokens:
                print(f"harvest: {n_tokens:,} tokens from layer {layer}", flush=True)
            if n_tokens >= max_tokens:
                break
    if not chunks:
        raise ValueError("harvest_activations got no token batches")
    print(f"harvest: {n_tokens:,} tokens from layer {layer}, done", flush=True)
    return torch.cat(chunks)


# --------------------------------------------------------------------------- metrics


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero latents per token, over codes (..., d_sae)."""
    return (codes != 0).sum(dim=-1).float().mean().item()


def fraction_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, for x and x_hat (..., d_model).

    0 is perfect, 1 is as good as predicting the mean.
    """
    return normalized_mse(x, x_hat).item()


def firing_counts(codes: torch.Tensor) -> torch.Tensor:
    """How many tokens each latent is non-zero on: codes (..., d_sae) -> counts (d_sae,)."""
    return (codes != 0).reshape(-1, codes.shape[-1]).sum(dim=0)


def dead_fraction(counts: torch.Tensor) -> float:
    """Fraction of latents that never fired, given firing counts over some tokens (d_sae,)."""
    return (counts == 0).float().mean().item()


def density_histogram(counts: torch.Tensor, n_tokens: int, width: int = 40) -> str:
    """Text histogram of log10(firing density), half-decade bins, one '#' per bar unit.

    counts are firing counts over n_tokens tokens (d_sae,); the tallest bar has `width` '#'.

    Example (4 latents firing on 0, 1, 50 and 500 of 1000 tokens):
        log10 density   latents
        [-3.0, -2.5)          1 ########################################
        ...
        never fired           1 ########################################
    """
    # Python floats on the CPU: double precision puts 1/1000 exactly at -3.0, and MPS has no
    # float64.
    counts = counts.tolist()
    log_density = [math.log10(count / n_tokens) for count in counts if count > 0]
    lowest = min(math.floor(2 * min(log_density)) / 2, -0.5) if log_density else -0.5
    edges = [lowest + 0.5 * i for i in range(int(round(-lowest / 0.5)) + 1)]
    bins = [sum(lo <= d < lo + 0.5 for d in log_density) for lo in edges[:-1]]
    if bins:  # density 1 (log 0) goes in the top bin
        bins[-1] += sum(d >= 0 for d in log_density)
    rows = [(f"[{lo:.1f}, {lo + 0.5:.1f})", n) for lo, n in zip(edges, bins)]
    rows.append(("never fired", counts.count(0)))
    tallest = max(n for _, n in rows) or 1
    lines = [f"log10 density over {n_tokens:,} tokens   latents"]
    lines += [f"{label:<14} {n:8d} {'#' * math.ceil(width * n / tallest)}" for label, n in rows]
    return "\n".join(lines)


def ce_loss_recovered(
    model: nn.Module,
    sae: nn.Module,
    token_batches: Iterable,
    layer: int,
) -> dict:
    """Next-token cross-entropy with the SAE spliced into the residual stream after block `layer`.

    recovered = (ce_zero_ablation - ce_sae) / (ce_zero_ablation - ce_clean): 1 means the
    reconstruction loses nothing, 0 means it is as bad as zero-ablation, which replaces that
    residual stream by zeros.

    Args:
        model: a GPT, on the SAE's device.
        sae: anything with forward(h) -> (h_hat, codes).
        token_batches: ids (B, T) or (ids, mask) pairs; a target counts where the mask is True.
        layer: block whose output is patched.

    Returns:
        dict of ce_clean, ce_sae, ce_zero_ablation (mean nats per target token), recovered.
    """
    device = next(model.parameters()).device
    patches = {
        "ce_clean": None,
        "ce_sae": lambda h: sae(h)[0],
        "ce_zero_ablation": torch.zeros_like,
    }
    totals, n_targets = dict.fromkeys(patches, 0.0), 0
    with eval_mode(model), torch.no_grad():
        for item in token_batches:
            ids, mask = ids_and_mask(item)
            ids = ids.to(device)
            target_mask = mask[:, 1:].to(device)  # position t predicts token t+1
            for name, patch in patches.items():
                logits, _ = model(ids, hidden_layer=layer, hidden_patch=patch)  # (B, T, V)
                nll = F.cross_entropy(
                    logits[:, :-1].transpose(1, 2),
                    ids[:, 1:],
                    reduction="none",
                )  # (B, T-1)
                totals[name] += nll[target_mask].sum().item()
            n_targets += int(target_mask.sum())
    ce = {name: total / n_targets for name, total in totals.items()}
    ablation_gap = ce["ce_zero_ablation"] - ce["ce_clean"]
    ce["recovered"] = (ce["ce_zero_ablation"] - ce["ce_sae"]) / ablation_gap
    return ce


@torch.no_grad()
def reconstruct_and_count(
    sae: nn.Module,
    activations: torch.Tensor,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions and firing counts in chunks, so N x d_sae codes are never held at once.

    sae(x) -> (x_hat, codes) runs on chunk_size vectors at a time. activations (N, d_model) ->
    x_hat on the activations' device (N, d_model), and firing counts (d_sae,).
    """
    device = next(sae.parameters()).device
    x_hats, counts = [], 0
    for chunk in activations.split(chunk_size):
        x_hat, codes = sae(chunk.to(device))
        x_hats.append(x_hat.to(activations.device))
        counts = counts + firing_counts(codes)
    return torch.cat(x_hats), counts


def evaluate_sae(
    model: nn.Module,
    sae: nn.Module,
    token_batches: Iterable,
    layer: int,
    train_activations: torch.Tensor | None = None,
    min_dead_tokens: int = 100_000,
) -> dict:
    """All quality metrics on held-out tokens, as a JSON-ready dict; prints the density histogram.

    Dead latents are counted over the held-out tokens when there are at least min_dead_tokens of
    them, and otherwise over train_activations (when given); the dict says which and over how many.

    Args:
        model: the GPT the SAE reads.
        sae: an SAE with `encode` and `decode`, on the model's device.
        token_batches: held-out ids (B, T) or (ids, mask) pairs; iterated once (kept as a list).
        layer: the block the SAE reads.
        train_activations: the SAE's training activations. Shape: (N_train, d_model).
        min_dead_tokens: tokens needed before "never fired" means dead.
    """
    token_batches = list(token_batches)  # read twice: activations, then CE with each patch
    activations = harvest_activations(model, token_batches, layer)  # (N, d_model)
    x_hat, counts = reconstruct_and_count(sae, activations)
    metrics = {
        "n_eval_tokens": len(activations),
        "fvu": fraction_variance_unexplained(activations, x_hat),
        "l0": counts.sum().item() / len(activations),  # total firings / tokens = mean L0
        **ce_loss_recovered(model, sae, token_batches, layer),
    }
    dead_source, n_dead_tokens = "held-out", len(activations)
    if len(activations) < min_dead_tokens and train_activations is not None:
        _, counts = reconstruct_and_count(sae, train_activations)
        dead_source, n_dead_tokens = "training", len(train_activations)
    histogram = density_histogram(counts, n_dead_tokens)
    print(histogram, flush=True)
    metrics.update(
        dead_fraction=dead_fraction(counts),
        dead_fraction_tokens=n_dead_tokens,
        dead_fraction_source=dead_source,
        density_histogram=histogram,
    )
    return metrics
