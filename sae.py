"""Sparse autoencoders on a GPT's residual stream, the feature space FPO constrains.

- `SparseAutoencoder`: a TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"),
  trained here by `train_sae` on activations collected by `harvest_activations`.
- `JumpReLUSAE`: a Gemma Scope SAE (Lieberum et al. 2024) loaded by `load_jumprelu_npz`.
Both expose the same `encode`, `decode` and `forward`, take raw residual-stream vectors, and are
saved as the dict `sae.checkpoint()` and rebuilt by `load_sae(checkpoint)`.
Quality metrics (FVU, L0, CE loss recovered, dead latents, density histogram) are bundled by
`evaluate_sae`; `top_activating_contexts` writes a per-latent report.
"""

import contextlib
import copy
import math
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import Interrupted, batch_indices, learning_rate, stop_at_step_boundary


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, ReLU them, zero the rest.

    Args:
        pre: pre-activations. Shape: (..., d_sae).
        k: entries kept per row.

    Returns:
        non-negative codes with at most k non-zeros per row. Shape: (..., d_sae).
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
        """pre = (s x - b_dec) @ W_enc + b_enc, the pre-activations before TopK.

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            pre. Shape: (..., d_sae).
        """
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes z = ReLU(TopK_k(pre)).

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            codes z. Shape: (..., d_sae).
        """
        return topk_relu(self.pre_activations(x), self.k)

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes z in sparse form: the values and latents of the k largest pre-activations.

        zeros(d_sae).scatter(-1, indices, values) == encode(x) exactly.

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            values: ReLU of the sae_k (= self.k) largest pre-activations, some possibly 0.
                Shape: (..., sae_k).
            indices: their latents, the same selection as `encode`. Shape: (..., sae_k).
        """
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)  # (..., sae_k)
        return F.relu(values), indices

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x_hat = (z @ W_dec + b_dec) / s, the raw-scale reconstruction.

        Args:
            codes: z. Shape: (..., d_sae).

        Returns:
            x_hat. Shape: (..., d_model).
        """
        return (codes @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, then decode; no side effects.

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            x_hat: the reconstruction. Shape: (..., d_model).
            codes: z. Shape: (..., d_sae).
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


class JumpReLUSAE(nn.Module):
    """JumpReLU sparse autoencoder in Gemma Scope's format; loaded from .npz, never trained here.

    For a raw vector x (d_model), exactly as Gemma Scope computes it (no b_dec subtracted first):
        pre   = x @ W_enc + b_enc              (d_sae)
        z     = ReLU(pre) * (pre > threshold)   a latent fires only above its own threshold
        x_hat = z @ W_dec + b_dec
    """

    def __init__(self, d_model: int, d_sae: int):
        super().__init__()
        self.d_model, self.d_sae = d_model, d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_model, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.threshold = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    @property
    def config(self) -> dict:
        """The shape of this SAE: what `load_sae` needs besides the state_dict."""
        return {"kind": "jumprelu", "d_model": self.d_model, "d_sae": self.d_sae}

    def checkpoint(self) -> dict:
        """{"sae_config", "state_dict"}: what `load_sae` reads back (extra keys are ignored)."""
        return {"sae_config": self.config, "state_dict": self.state_dict()}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes z = ReLU(pre) * (pre > threshold).

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            codes z. Shape: (..., d_sae).
        """
        pre = x @ self.W_enc + self.b_enc  # (..., d_sae)
        return F.relu(pre) * (pre > self.threshold)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x_hat = z @ W_dec + b_dec, the reconstruction.

        Args:
            codes: z. Shape: (..., d_sae).

        Returns:
            x_hat. Shape: (..., d_model).
        """
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, then decode; no side effects.

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            x_hat: the reconstruction. Shape: (..., d_model).
            codes: z. Shape: (..., d_sae).
        """
        codes = self.encode(x)
        return self.decode(codes), codes


def load_jumprelu_npz(path) -> JumpReLUSAE:
    """Load Gemma Scope's params.npz as a JumpReLUSAE.

    The file holds W_enc (d_model, d_sae), W_dec (d_sae, d_model), threshold (d_sae),
    b_enc (d_sae) and b_dec (d_model). Raises ValueError naming any missing array or mismatched
    shape.
    """
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    names = ("W_enc", "W_dec", "threshold", "b_enc", "b_dec")
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; found {sorted(arrays)}")
    if arrays["W_enc"].ndim != 2:
        raise ValueError(
            f"{path}: W_enc must be 2-D (d_model, d_sae), got shape {arrays['W_enc'].shape}"
        )
    d_model, d_sae = arrays["W_enc"].shape
    expected = {
        "W_enc": (d_model, d_sae),
        "W_dec": (d_sae, d_model),
        "threshold": (d_sae,),
        "b_enc": (d_sae,),
        "b_dec": (d_model,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(
                f"{path}: {name} has shape {arrays[name].shape}, expected {shape} "
                f"(d_model={d_model}, d_sae={d_sae} from W_enc)"
            )
    sae = JumpReLUSAE(d_model, d_sae)
    state_dict = {
        name: torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)) for name in expected
    }
    sae.load_state_dict(state_dict)
    return sae


def load_sae(checkpoint: dict) -> SparseAutoencoder | JumpReLUSAE:
    """Rebuild either kind of SAE from a dict holding its `checkpoint()` (e.g. from torch.load)."""
    config, state_dict = checkpoint["sae_config"], checkpoint["state_dict"]
    if config["kind"] == "topk":
        sae = SparseAutoencoder(config["d_model"], config["d_sae"], config["k"])
    elif config["kind"] == "jumprelu":
        sae = JumpReLUSAE(config["d_model"], config["d_sae"])
    else:
        raise ValueError(f"unknown SAE kind {config['kind']!r}; expected 'topk' or 'jumprelu'")
    sae.load_state_dict(state_dict)
    return sae


# --------------------------------------------------------------------------- training


def normalized_mse(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """sum ||target - prediction||^2 / sum ||target - mean(target)||^2, a differentiable scalar.

    Args:
        target: Shape: (..., d).
        prediction: Shape: (..., d).
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

    Args:
        tokens_since_fired: tokens seen since each latent last fired. Shape: (d_sae,).
        codes: the batch's codes. Shape: (B, d_sae).

    Returns:
        the updated counts. Shape: (d_sae,).
    """
    fired = (codes > 0).any(dim=0)  # (d_sae,)
    return torch.where(fired, 0, tokens_since_fired + codes.shape[0])


def geometric_median(points: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The geometric median of points, by Weiszfeld's iterations from the mean.

    Each iteration: m <- sum_i w_i p_i / sum_i w_i with w_i = 1 / ||p_i - m||.

    Args:
        points: Shape: (N, d).
        iterations: how many updates of m.

    Returns:
        the point minimising the summed distance to all points (robust to outliers, unlike the
        mean). Shape: (d,).
    """
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)  # (N,)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


def initialize_sae(activations: torch.Tensor, d_sae: int, k: int, seed: int) -> SparseAutoencoder:
    """A TopK SAE initialised from data.

    - input_scale s = sqrt(d_model / mean ||x||^2), so the scaled data has E||x'||^2 = d_model;
    - b_dec = geometric median of (up to 16,384 sampled) scaled activations;
    - W_dec rows random unit vectors, W_enc = W_dec^T, b_enc = 0.

    Args:
        activations: raw residual-stream vectors. Shape: (N, d_model).
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
    resume: dict | None = None,
) -> SparseAutoencoder:
    """Train a TopK SAE on raw activations with Adam.

    Each step: loss = FVU(x, x_hat) + aux_coef * AuxK, with AuxK over the top aux_k latents that
    have not fired for dead_tokens tokens, reconstructing the residual x - x_hat (detached); then
    remove_parallel_grads, Adam step, normalize_decoder, and the dead-latent counters. Batches are
    sampled with replacement by batch_indices(seed, step).
    On Ctrl-C, raises Interrupted("sae", step, state). Resuming from that state with the same
    arguments ends with exactly the SAE an uninterrupted run gives (bit-identical on the CPU).

    Args:
        activations: raw residual-stream vectors; training runs on their device.
            Shape: (N, d_model).
        d_sae: number of latents.
        k: latents active per token.
        steps, batch_size, lr, warmup_steps: the optimisation (learning_rate's "linear_tail"
            schedule).
        seed: fixes the initialisation and every batch.
        aux_k, aux_coef: AuxK's dead latents per token and loss weight (1/32 as in Gao et al.).
        dead_tokens: a latent that has not fired for this many training tokens counts as dead.
        log_every: steps between progress lines.
        resume: an Interrupted's state, to continue that run.
    """
    settings = dict(
        n_activations=len(activations),
        d_model=activations.shape[1],
        d_sae=d_sae,
        k=k,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        seed=seed,
        aux_k=aux_k,
        aux_coef=aux_coef,
        dead_tokens=dead_tokens,
    )
    device = activations.device
    if resume is None:
        sae = initialize_sae(activations, d_sae, k, seed)
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
        tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        completed = 0
    else:
        if resume["settings"] != settings:
            raise ValueError(f"resume state was made with {resume['settings']}, not {settings}")
        sae = load_sae(resume["sae"]).to(device)
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
        optimizer.load_state_dict(resume["optimizer_state"])
        tokens_since_fired = resume["tokens_since_fired"].to(device)
        completed = resume["step"]

    start_time = time.time()
    fvu_sum, aux_sum, logged_steps = 0.0, 0.0, 0
    with stop_at_step_boundary() as interrupt_requested:
        try:
            for step in range(completed, steps):
                if interrupt_requested.is_set():
                    raise KeyboardInterrupt
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
                aux = auxk_loss(
                    pre,
                    dead,
                    residual=(x - x_hat).detach(),
                    W_dec=sae.W_dec,
                    input_scale=sae.input_scale,
                    aux_k=aux_k,
                )
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
                completed = step + 1

                fvu_sum += fvu.item()
                aux_sum += aux.item()
                logged_steps += 1
                if completed % log_every == 0 or completed == steps:
                    print(
                        f"sae step {completed}/{steps} | fvu {fvu_sum / logged_steps:.4f} | "
                        f"auxk {aux_sum / logged_steps:.4f} | "
                        f"dead {dead.float().mean().item():.3f} | "
                        f"lr {optimizer.param_groups[0]['lr']:.2e} | "
                        f"{time.time() - start_time:.1f}s",
                        flush=True,
                    )
                    fvu_sum, aux_sum, logged_steps = 0.0, 0.0, 0
        except KeyboardInterrupt:
            state = {
                "settings": settings,
                "step": completed,
                "sae": copy.deepcopy(sae.checkpoint()),
                "optimizer_state": copy.deepcopy(optimizer.state_dict()),
                "tokens_since_fired": tokens_since_fired.clone(),
            }
            raise Interrupted(stage="sae", step=completed, state=state) from None
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
    """Mean number of non-zero latents per token.

    Args:
        codes: Shape: (..., d_sae).
    """
    return (codes != 0).sum(dim=-1).float().mean().item()


def fraction_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

    0 is perfect, 1 is as good as predicting the mean.

    Args:
        x: Shape: (..., d_model).
        x_hat: Shape: (..., d_model).
    """
    return normalized_mse(x, x_hat).item()


def firing_counts(codes: torch.Tensor) -> torch.Tensor:
    """How many tokens each latent is non-zero on.

    Args:
        codes: Shape: (..., d_sae).

    Returns:
        the counts. Shape: (d_sae,).
    """
    return (codes != 0).reshape(-1, codes.shape[-1]).sum(dim=0)


def dead_fraction(counts: torch.Tensor) -> float:
    """Fraction of latents that never fired.

    Args:
        counts: firing counts over some tokens. Shape: (d_sae,).
    """
    return (counts == 0).float().mean().item()


def density_histogram(counts: torch.Tensor, n_tokens: int, width: int = 40) -> str:
    """Text histogram of log10(firing density), half-decade bins, one '#' per bar unit.

    Args:
        counts: firing counts over n_tokens tokens. Shape: (d_sae,).
        n_tokens: tokens the counts were taken over.
        width: '#' in the tallest bar.

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

    Args:
        sae: TopK or JumpReLU SAE.
        activations: raw vectors. Shape: (N, d_model).
        chunk_size: vectors per chunk.

    Returns:
        x_hat (N, d_model) on the activations' device, and firing counts (d_sae,).
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
        sae: TopK or JumpReLU SAE, on the model's device.
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
        sae: TopK or JumpReLU SAE.
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
