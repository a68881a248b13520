"""Gemma Scope's JumpReLU SAE: loading params.npz, and its sparse codes for D(y)."""

import numpy as np
import pytest
import torch

import fpo
from gemma_scope import load_jumprelu_npz


def gemma_scope_arrays(d_model=6, d_sae=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(size=(d_model, d_sae)).astype(np.float32),
            "W_dec": rng.normal(size=(d_sae, d_model)).astype(np.float32),
            "threshold": rng.uniform(0.0, 1.0, size=d_sae).astype(np.float32),
            "b_enc": rng.normal(size=d_sae).astype(np.float32),
            "b_dec": rng.normal(size=d_model).astype(np.float32)}


def test_jumprelu_npz_matches_hand_computation(tmp_path):
    arrays = gemma_scope_arrays()
    np.savez(tmp_path / "params.npz", **arrays)
    model = load_jumprelu_npz(tmp_path / "params.npz")
    x = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)

    pre = x @ arrays["W_enc"] + arrays["b_enc"]  # Gemma Scope: no b_dec subtracted
    expected_codes = np.where(pre > arrays["threshold"], np.maximum(pre, 0), 0)
    expected_x_hat = expected_codes @ arrays["W_dec"] + arrays["b_dec"]
    x_hat, codes = model(torch.from_numpy(x))
    np.testing.assert_allclose(codes.detach().numpy(), expected_codes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_hat.detach().numpy(), expected_x_hat, rtol=1e-5, atol=1e-5)
    assert 0 < (expected_codes > 0).sum() < expected_codes.size  # the threshold did something


def test_jumprelu_npz_errors_name_the_problem(tmp_path):
    arrays = gemma_scope_arrays()
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(ValueError, match="missing arrays \\['threshold'\\]"):
        load_jumprelu_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad_shape.npz", **{**arrays, "b_dec": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="b_dec has shape \\(5,\\), expected \\(6,\\)"):
        load_jumprelu_npz(tmp_path / "bad_shape.npz")


def test_encode_sparse_scatters_back_to_encode(tmp_path):
    """encode_sparse keeps every non-zero code: densified, it is encode exactly, with m the most
    latents any row fires (fewer than d_sae here), and it takes zero rows."""
    np.savez(tmp_path / "params.npz", **gemma_scope_arrays(d_model=6, d_sae=40))
    sae = load_jumprelu_npz(tmp_path / "params.npz")
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    codes = sae.encode(x)  # (9, 40)
    values, indices = sae.encode_sparse(x)  # (9, m)
    assert values.shape[1] == (codes > 0).sum(dim=-1).max() < 40
    assert torch.equal(torch.zeros_like(codes).scatter(-1, indices, values), codes)
    values, indices = sae.encode_sparse(x[:0])
    assert values.shape == indices.shape == (0, 1)


def test_cached_feature_mse_with_encode_sparse_equals_dense_pooling(tmp_path):
    """D(y) through fpo.cached_feature_mse with encode_sparse equals D(y) from every position's
    dense codes pooled by fpo.pooled_features, in value and in gradient."""
    np.savez(tmp_path / "params.npz", **gemma_scope_arrays(d_model=6, d_sae=40))
    sae = load_jumprelu_npz(tmp_path / "params.npz").requires_grad_(False)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 5, 6, generator=generator, requires_grad=True)
    response_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    reference_hidden = torch.randn(3, 5, 6, generator=generator)
    cache = fpo.build_reference_cache(
        reference_fn=lambda input_ids: (torch.zeros(3, 5, 2), reference_hidden),
        sae_encode=sae.encode,
        batches=[(torch.arange(3), torch.zeros(3, 5, dtype=torch.long), response_mask)],
        n_rows=3,
        d_sae=40,
    )
    dense = fpo.feature_mse(fpo.pooled_features(sae.encode(hidden), response_mask),
                            fpo.reference_pooled_features(cache, torch.arange(3)), k=4)
    sparse = fpo.cached_feature_mse(hidden, response_mask, sae.encode_sparse, cache,
                                    row_ids=torch.arange(3), k=4)
    assert dense.min() > 0
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=0)
    (dense_grad,) = torch.autograd.grad(dense.sum(), hidden)
    (sparse_grad,) = torch.autograd.grad(sparse.sum(), hidden)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6)
