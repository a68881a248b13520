import math
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fpo
import sae as sae_module
from runtime import Interrupted, UsageError
from helpers import counting_batches
from model import GPT, GPTConfig
from sae import (
    SparseAutoencoder,
    ce_loss_recovered,
    dead_fraction,
    density_histogram,
    evaluate_sae,
    firing_counts,
    fraction_variance_unexplained,
    harvest_activations,
    initialize_sae,
    l0,
    load_sae,
    train_sae,
)


def planted_activations(n=20_000, n_atoms=64, dim=32, active=3, noise=0.01, seed=0):
    """Sparse non-negative combinations of a known unit-norm dictionary, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, dim, generator=g), dim=1)  # (n_atoms, dim)
    which = torch.rand(n, n_atoms, generator=g).topk(active, dim=1).indices  # (n, active)
    weights = 0.5 + torch.rand(n, active, generator=g)  # (n, active)
    codes = torch.zeros(n, n_atoms).scatter(1, which, weights)  # (n, n_atoms)
    return codes @ atoms + noise * torch.randn(n, dim, generator=g), atoms


@pytest.fixture(scope="module")
def planted():
    x, atoms = planted_activations()
    trained = train_sae(
        x, d_sae=128, k=4, steps=600, batch_size=256, lr=4e-3, dead_tokens=5_000, aux_k=32,
        log_every=10_000
    )
    return x, atoms, trained


@pytest.fixture(scope="module")
def briefly_trained():
    """A few steps on planted data: enough for what must hold after any update (the fast tier)."""
    x, atoms = planted_activations(n=2_000)
    trained = train_sae(x, d_sae=128, k=4, steps=20, batch_size=256, lr=4e-3, log_every=10_000)
    return x, atoms, trained


@pytest.mark.slow
def test_planted_dictionary_is_recovered(planted):
    x, atoms, trained = planted
    cosines = atoms @ trained.W_dec.detach().T  # (n_atoms, d_sae), both unit norm
    assert cosines.max(dim=1).values.mean() >= 0.9


def test_decoder_rows_stay_unit_norm(briefly_trained):
    _, _, trained = briefly_trained
    torch.testing.assert_close(trained.W_dec.detach().norm(dim=1), torch.ones(128))


def test_remove_parallel_grads_leaves_grad_orthogonal_to_each_row():
    x, _ = planted_activations(n=512)
    model = initialize_sae(x, d_sae=64, k=4, seed=0)
    x_hat, _ = model(x)
    F.mse_loss(x_hat, x).backward()
    assert (model.W_dec.grad * model.W_dec).sum(dim=1).abs().max() > 1e-4  # something to remove
    model.remove_parallel_grads()
    assert (model.W_dec.grad * model.W_dec).sum(dim=1).abs().max() < 1e-7


def test_encode_is_topk_nonnegative_and_forward_has_no_side_effects(briefly_trained):
    x, _, trained = briefly_trained
    before = {name: t.clone() for name, t in trained.state_dict().items()}
    x_hat, codes = trained(x[:100])
    assert codes.min() >= 0 and ((codes != 0).sum(dim=1) <= 4).all()
    torch.testing.assert_close(x_hat, trained.decode(trained.encode(x[:100])))
    for name, t in trained.state_dict().items():
        assert torch.equal(t, before[name])


def random_sae(d_model=8, d_sae=24, sae_k=4, seed=0):
    """A float64 TopK SAE with random weights (no training needed to test the encode paths)."""
    gen = torch.Generator().manual_seed(seed)
    model = SparseAutoencoder(d_model, d_sae, sae_k).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen, dtype=torch.float64))
    return model


def test_encode_topk_densifies_to_encode_exactly():
    model = random_sae()
    with torch.no_grad():
        model.b_enc -= 4.0  # so that some of the sae_k largest pre-activations are negative
    x = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values, indices = model.encode_topk(x)
    assert values.shape == indices.shape == (3, 50, 4) and values.min() >= 0
    assert (values == 0).any()  # some selected pre-activations were negative: ReLU applied
    dense = torch.zeros(3, 50, 24, dtype=torch.float64).scatter(-1, indices, values)
    assert torch.equal(dense, model.encode(x))


def test_pooling_from_encode_topk_equals_encode_then_pooled_features_in_values_and_gradients():
    model = random_sae(d_sae=12, sae_k=4)  # few latents: the same latent fires at several positions
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    response_mask = torch.zeros(4, 7, dtype=torch.long)
    response_mask[0, 3:] = 1
    response_mask[1, 2:5] = 1  # padded
    response_mask[2, 6] = 1  # one token
    # row 3: an empty response
    reference = torch.rand(4, 12, generator=gen, dtype=torch.float64)
    reference = reference * (torch.rand(4, 12, generator=gen) < 0.4)
    fpo_k = 3

    dense_pooled = fpo.pooled_features(model.encode(hidden), response_mask)  # (4, 12)
    values, indices = model.encode_topk(hidden[:, :-1][response_mask[:, 1:].bool()])  # (N, sae_k)
    fast_pooled = fpo.pooled_topk_features(values, indices, response_mask, model.d_sae)  # (4, 12)
    torch.testing.assert_close(fast_pooled, dense_pooled, rtol=0, atol=1e-14)

    dense_feature_mse = fpo.feature_mse(dense_pooled, reference, fpo_k)
    fast_feature_mse = fpo.feature_mse(fast_pooled, reference, fpo_k)
    torch.testing.assert_close(fast_feature_mse, dense_feature_mse, rtol=0, atol=1e-13)
    (dense_grad,) = torch.autograd.grad(dense_feature_mse.sum(), hidden)
    (fast_grad,) = torch.autograd.grad(fast_feature_mse.sum(), hidden)
    assert dense_grad.abs().sum() > 0
    torch.testing.assert_close(fast_grad, dense_grad, rtol=0, atol=1e-13)


def test_encode_takes_raw_scale_inputs():
    x, _ = planted_activations(n=10_000)
    raw = 1000.0 * x + 50.0  # far from unit scale, with an offset
    trained = train_sae(raw, d_sae=128, k=4, steps=300, batch_size=256, lr=4e-3, log_every=10_000)
    expected_scale = math.sqrt(32 / raw.pow(2).sum(dim=1).mean().item())
    assert trained.input_scale.item() == pytest.approx(expected_scale, rel=1e-5)
    x_hat, _ = trained(raw)
    assert fraction_variance_unexplained(raw, x_hat) < 0.1


def test_auxk_revives_latents_dead_at_initialisation(monkeypatch):
    x, _ = planted_activations(n=10_000)
    original_initialize = sae_module.initialize_sae

    def initialize_with_silenced_latents(*args, **kwargs):
        # Latents 16.. get encoder columns 50x too small: they never win TopK against the others,
        # so only AuxK can give them a gradient.
        model = original_initialize(*args, **kwargs)
        with torch.no_grad():
            model.W_enc[:, 16:] *= 0.02
        return model

    monkeypatch.setattr(sae_module, "initialize_sae", initialize_with_silenced_latents)

    def alive_after_training(aux_k):
        trained = train_sae(
            x, d_sae=64, k=4, steps=100, batch_size=256, lr=4e-3, dead_tokens=1_000, aux_k=aux_k,
            log_every=10_000
        )
        return (firing_counts(trained.encode(x)) > 0).sum().item()

    without_auxk = alive_after_training(aux_k=0)
    with_auxk = alive_after_training(aux_k=16)
    assert without_auxk <= 32
    assert with_auxk >= 56


def test_train_sae_gives_auxk_the_residual_not_the_input(monkeypatch):
    # AuxK's dead latents reconstruct the main error e = x - x_hat (detached), not x itself. Passing
    # x would still revive dead latents (test above), so check the argument directly: at each step,
    # record the batch, the SAE being trained, and what auxk_loss receives as `residual`.
    x, _ = planted_activations(n=2_000)
    original_initialize = sae_module.initialize_sae
    original_batch_indices = sae_module.batch_indices
    original_auxk_loss = sae_module.auxk_loss
    trained = []  # the SAE train_sae builds; its weights are the current step's when AuxK runs
    batches = []
    checked_steps = []

    def initialize_and_keep(*args, **kwargs):
        trained.append(original_initialize(*args, **kwargs))
        return trained[0]

    def batch_indices_and_keep(*args, **kwargs):
        batches.append(original_batch_indices(*args, **kwargs))
        return batches[-1]

    def auxk_loss_and_check(pre, dead, residual, W_dec, input_scale, aux_k):
        batch = x[batches[-1]]  # (B, d_model)
        with torch.no_grad():
            x_hat, _ = trained[0](batch)
        assert not residual.requires_grad  # detached: AuxK moves no weight through x_hat
        torch.testing.assert_close(residual, batch - x_hat)
        checked_steps.append(len(batches))
        return original_auxk_loss(pre, dead, residual, W_dec, input_scale, aux_k)

    monkeypatch.setattr(sae_module, "initialize_sae", initialize_and_keep)
    monkeypatch.setattr(sae_module, "batch_indices", batch_indices_and_keep)
    monkeypatch.setattr(sae_module, "auxk_loss", auxk_loss_and_check)
    train_sae(
        x, d_sae=32, k=4, steps=5, batch_size=64, lr=4e-3, dead_tokens=64, aux_k=8, log_every=10_000
    )
    assert checked_steps == [1, 2, 3, 4, 5]


def test_training_is_deterministic_and_resumes_bit_identically(monkeypatch, tmp_path):
    x, _ = planted_activations(n=5_000)
    settings = dict(
        d_sae=64, k=4, steps=60, batch_size=128, lr=4e-3, dead_tokens=500, aux_k=16, seed=3,
        log_every=10_000
    )
    uninterrupted = train_sae(x, **settings)
    again = train_sae(x, **settings)
    pairs = zip(uninterrupted.state_dict().values(), again.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)

    original_batch_indices = sae_module.batch_indices

    def ctrl_c_during_step_25(n, batch_size, seed, step):
        if step == 25:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, deferred to the end of the step
        return original_batch_indices(n, batch_size, seed, step)

    monkeypatch.setattr(sae_module, "batch_indices", ctrl_c_during_step_25)
    resume_path = tmp_path / "sae.resume.pt"
    saved_with = {"lr": 4e-3}
    with pytest.raises(Interrupted) as interrupted:
        train_sae(x, **settings, resume_path=resume_path, settings=saved_with)
    monkeypatch.undo()
    assert interrupted.value.step == 26  # the Ctrl-C lands after step 25's update
    assert interrupted.value.saved_to == resume_path

    resumed = train_sae(x, **settings, resume_path=resume_path, settings=saved_with, resume=True)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    with pytest.raises(UsageError, match="--lr 0.004"):
        train_sae(x, **settings, resume_path=resume_path, settings={"lr": 1e-3}, resume=True)


def test_save_load_round_trip_gives_identical_codes(briefly_trained, tmp_path):
    x, _, trained = briefly_trained
    # extra keys are fine
    torch.save({"kind": "sae", **trained.checkpoint(), "metrics": {}}, tmp_path / "sae.pt")
    loaded = load_sae(torch.load(tmp_path / "sae.pt"))
    assert isinstance(loaded, SparseAutoencoder) and loaded.config == trained.config
    assert torch.equal(loaded.encode(x[:500]), trained.encode(x[:500]))
    with pytest.raises(ValueError, match="unknown SAE kind"):
        config = {**trained.config, "kind": "l1"}
        load_sae({"sae_config": config, "state_dict": trained.state_dict()})


# ----------------------------------------------------------------------------- metrics


def test_fvu_l0_and_dead_fraction_on_constructed_inputs():
    x = torch.randn(100, 8)
    assert fraction_variance_unexplained(x, x) == 0.0
    assert fraction_variance_unexplained(x, x.mean(dim=0).expand_as(x)) == pytest.approx(1.0)
    codes = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])  # 2 and 1 non-zeros
    assert l0(codes) == 1.5
    assert firing_counts(codes).tolist() == [1, 1, 1, 0]
    assert dead_fraction(torch.tensor([0, 5, 0, 1])) == 0.5


def test_density_histogram_text():
    text = density_histogram(torch.tensor([0, 1, 50, 500]), n_tokens=1000)
    lines = text.splitlines()
    assert lines[0].startswith("log10 density over 1,000 tokens")
    bins = {line[:14].strip(): int(line[14:23]) for line in lines[1:]}
    # log10 densities: -3.0, -1.30, -0.30 and one latent that never fired
    assert bins == {"[-3.0, -2.5)": 1, "[-2.5, -2.0)": 0, "[-2.0, -1.5)": 0, "[-1.5, -1.0)": 1,
                    "[-1.0, -0.5)": 0, "[-0.5, 0.0)": 1, "never fired": 1}
    assert lines[1].endswith("#" * 40)


class DtypesMade(TorchFunctionMode):
    """Records the dtype of every tensor torch makes inside the block."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.dtypes.add(value.dtype)
        return result


def test_density_histogram_makes_no_float64_tensor():
    # the counts live on the SAE's device, and MPS has no float64
    with DtypesMade() as made:
        text = density_histogram(torch.tensor([0, 1, 50, 500]), n_tokens=1000)
    assert torch.float64 not in made.dtypes
    assert "[-3.0, -2.5)          1" in text  # density 1/1000 is exactly -3.0


@pytest.fixture(scope="module")
def tiny_gpt():
    """A 2-layer GPT trained for a moment on a counting pattern, so the residual stream matters."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        ids = (torch.randint(32, (16, 1), generator=g) + torch.arange(16)) % 32  # (16, 16)
        logits, _ = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


class IdentitySAE(nn.Module):
    def forward(self, h):
        return h, h


def test_ce_loss_recovered_is_one_for_an_identity_patch(tiny_gpt):
    ce = ce_loss_recovered(tiny_gpt, IdentitySAE(), counting_batches(n_batches=3), layer=-1)
    assert ce["ce_sae"] == ce["ce_clean"]
    # the learned pattern really is in the stream
    assert ce["ce_zero_ablation"] > ce["ce_clean"] + 0.5
    assert ce["recovered"] == pytest.approx(1.0)


def test_harvest_train_and_evaluate_on_a_tiny_gpt(tiny_gpt, capsys):
    tiny_gpt.train()
    batches = counting_batches(n_batches=40)
    padding_mask = torch.ones(8, 16, dtype=torch.bool)
    padding_mask[:, 12:] = False
    activations = harvest_activations(
        tiny_gpt,
        [(ids, padding_mask) for ids in batches],
        layer=-1,
        max_tokens=3_000,
    )
    assert activations.shape == (3_000, 32) and activations.device.type == "cpu"
    assert tiny_gpt.training  # mode restored
    _, hidden = tiny_gpt(batches[0], hidden_layer=-1)
    # row 0, masked-in positions
    torch.testing.assert_close(activations[:12], hidden[0, :12].detach())

    trained = train_sae(
        activations, d_sae=64, k=4, steps=200, batch_size=256, lr=4e-3, log_every=100
    )
    held_out = counting_batches(n_batches=4, seed=2)
    metrics = evaluate_sae(
        tiny_gpt,
        trained,
        iter(held_out),
        layer=-1,
        train_activations=activations,
    )
    assert metrics["fvu"] < 0.2 and metrics["recovered"] > 0.8 and metrics["l0"] <= 4
    assert metrics["dead_fraction_source"] == "training"
    assert metrics["dead_fraction_tokens"] == 3_000
    assert "sae step 200/200" in capsys.readouterr().out



def test_encode_subtracts_b_dec_before_the_encoder_on_a_hand_worked_example():
    """pre = (s x - b_dec) @ W_enc + b_enc: with s = 2, x = (1, 0), b_dec = (1, 3), W_enc the
    identity and b_enc = (0.5, 0), pre = (1.5, -3), so k = 1 keeps latent 0 at 1.5 (without
    b_dec the pre-activations would be (2.5, 0): another value)."""
    sae = SparseAutoencoder(d_model=2, d_sae=2, k=1)
    with torch.no_grad():
        sae.input_scale.fill_(2.0)
        sae.b_dec.copy_(torch.tensor([1.0, 3.0]))
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.copy_(torch.tensor([0.5, 0.0]))
    codes = sae.encode(torch.tensor([[1.0, 0.0]]))
    assert codes.tolist() == [[1.5, 0.0]]
    values, indices = sae.encode_topk(torch.tensor([[1.0, 0.0]]))
    assert (values.tolist(), indices.tolist()) == ([[1.5]], [[0]])


def test_a_latent_that_fires_has_its_dead_counter_reset_and_the_others_grow_by_the_batch():
    """Counts (5, 0, 7) after a batch of 2 tokens in which latent 0 fires (on the second token)
    and latent 2 does not: (0, 2, 9)."""
    counts = torch.tensor([5, 0, 7])
    codes = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])  # (B=2, d_sae=3)
    assert sae_module.update_tokens_since_fired(counts, codes).tolist() == [0, 2, 9]
