"""Device bugs, caught on a CPU: the tiny pipeline run on a pretend CUDA and a pretend MPS device
(tests/pretend_device.py's PretendDevice, which fails where the real device would)."""

import copy

import pytest
import torch

import config
import train
from conftest import readme_snippet
from helpers import TINY
from model import GPT, GPTConfig
from pretend_device import DeviceMismatch, pretend
from sae import SparseAutoencoder


def test_the_pretend_device_follows_models_gradients_and_optimizer_state(monkeypatch):
    with pretend("cuda", monkeypatch) as mode:
        # Module.to swaps each parameter's data
        model = torch.nn.Linear(4, 2).to(torch.device("cuda"))
        optimizer = torch.optim.AdamW(model.parameters())
        x = torch.ones(3, 4).to("cuda")
        model(x).sum().backward()
        optimizer.step()
        assert (mode.tagged(model.weight) and mode.tagged(model.weight.grad)
                and model.weight.device.type == "cuda")
        assert mode.tagged(optimizer.state[model.weight]["exp_avg"])
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a CPU scalar may join a device op
        assert not mode.tagged(x.cpu()) and mode.tagged(x)  # .cpu() copies; x stays on the device


def test_the_pretend_device_catches_mixed_ops_cpu_generators_and_float64_on_mps(monkeypatch):
    with pretend("cuda", monkeypatch):
        on_device = torch.ones(3, device="cuda")
        with pytest.raises(DeviceMismatch, match="mixes"):
            on_device + torch.ones(3)
        with pytest.raises(DeviceMismatch, match="cpu generator"):
            torch.multinomial(on_device, 1, generator=torch.Generator().manual_seed(0))
        with pytest.raises(DeviceMismatch, match="cuda generator"):
            torch.randint(5, (3,), generator=torch.Generator(device="cuda"))
        torch.multinomial(on_device, 1, generator=torch.Generator(device="cuda").manual_seed(0))
        on_device.double()  # CUDA has float64
    with pretend("mps", monkeypatch):
        with pytest.raises(DeviceMismatch, match="float64"):
            torch.ones(3).double().to("mps")


def test_the_readme_snippet_runs_unchanged_with_every_input_on_a_device_and_the_cache_on_the_cpu(
    monkeypatch
):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    sae = SparseAutoencoder(16, 32, 4)
    input_ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    response_mask = torch.zeros(4, 12, dtype=torch.bool)
    response_mask[:, 5:] = True
    with pretend("cuda", monkeypatch) as mode:
        cuda = torch.device("cuda")
        policy.to(cuda), reference.to(cuda), sae.to(cuda)
        scope = {
            "sae": sae,
            "lm": lambda ids: policy(ids, hidden_layer=-1),
            "reference_lm": lambda ids: reference(ids, hidden_layer=-1),
            "input_ids": input_ids.to(cuda), "response_mask": response_mask.to(cuda),
            "row_ids": torch.arange(4, device=cuda),
        }
        exec(readme_snippet(), scope)
        assert not mode.tagged(scope["cache"]["feature_values"])  # the cache lives on the CPU
        assert mode.tagged(scope["reference_pooled"]) and mode.tagged(scope["losses"])
        assert all(mode.tagged(p.grad) for p in policy.parameters())


# The tiny pipeline, shrunk further: device bugs need each code path once, not learning.
SMALL = TINY + [
    "--n_docs", "200", "--pretrain_steps", "4", "--sae_tokens", "2000", "--sae_eval_tokens", "500",
    "--sae_steps", "4",
    "--n_pairs", "40", "--n_test_pairs", "16", "--pref_steps", "2", "--n_eval_prompts", "2",
    "--max_new_tokens", "4", "--log_every", "1",
]


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread: on this shared 2-core machine, 12 s instead of
    110 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_every_stage_and_every_method_run_on_a_pretend_device(
    device, tmp_path, monkeypatch, one_thread
):
    argv = SMALL + ["--out_dir", str(tmp_path), "--device", device]
    with pretend(device, monkeypatch):
        train.main(argv)
        for method in config.METHODS:
            for stage in ("prefer", "eval"):  # eval too: it runs each method's loss and D(y)
                train.main(argv + ["--stage", stage, "--method", method])
    assert (tmp_path / "results.json").exists()
