"""Gemma Scope's JumpReLU SAEs (Lieberum et al. 2024): the SAE the paper trains Gemma-2-2B with.

`load_jumprelu_npz` reads a Gemma Scope params.npz as a `JumpReLUSAE`; its `encode_sparse` is
the `sparse_encode` that fpo.cached_feature_mse takes. Only this integration uses a JumpReLU SAE
(the repository's own pipeline trains a TopK one, sae.py), so it lives here, and nothing at the
repository's top level imports it.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes z = ReLU(pre) * (pre > threshold).

        Args:
            x: raw residual-stream vectors. Shape: (..., d_model).

        Returns:
            codes z. Shape: (..., d_sae).
        """
        pre = x @ self.W_enc + self.b_enc  # (..., d_sae)
        return F.relu(pre) * (pre > self.threshold)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes z in sparse form, for fpo.cached_feature_mse: each row's m largest codes.

        m is the most latents any row fires, so every non-zero code is kept and the dropped ones
        are 0 with zero gradient: zeros(d_sae).scatter(-1, indices, values) == encode(x) exactly.
        Why not all d_sae codes with indices 0..d_sae-1: at Gemma Scope's width, 16k latents of
        which on average about a hundred fire per token, the pooling would then index and sum
        (N, 16k) tensors where (N, m) ones hold the same codes.

        Example, d_sae = 4: codes [[0.0, 0.7, 0.0, 0.2], [0.5, 0.0, 0.0, 0.0]] fire at most 2
        latents per row, so m = 2: values [[0.7, 0.2], [0.5, 0.0]], indices [[1, 3], [0, j]]
        (any j other than 0: its value is 0; within a row the order may differ).

        Args:
            x: raw residual-stream vectors. Shape: (N, d_model).

        Returns:
            values: the m largest codes of each row, some possibly 0. Shape: (N, m).
            indices: their latents. Shape: (N, m).
        """
        codes = self.encode(x)  # (N, d_sae)
        m = max(1, int((codes > 0).sum(dim=-1).max())) if len(codes) else 1
        return codes.topk(m, dim=-1, sorted=False)

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
