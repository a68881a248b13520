"""Device bugs, caught on a CPU: the tiny pipeline run on a pretend CUDA and a pretend MPS device.

`PretendDevice`, a TorchFunctionMode, stands in for the accelerator. `.to(device)` and factories
given `device=` return CPU tensors whose storage it tags as being on the device; every op's outputs
are tagged when its inputs are, and tagged tensors report the pretend device from `.device`, so code
like `x.to(y.device)` or `torch.arange(T, device=ids.device)` behaves as on the real device. Like
the real device, it fails on
- an op mixing tagged and untagged tensors (untagged 0-dim tensors aside: PyTorch lets a CPU
  scalar into a GPU op; `copy_` and the other cross-device ops of MAY_MIX aside);
- sampling into a tagged tensor with a CPU generator, or into an untagged one with a device's;
- on "mps", any tagged float64 tensor (MPS has no float64); `.numpy()` of a tagged tensor.
The few torch.cuda / torch.mps calls the pipeline makes get harmless stand-ins (`pretend`).
"""

import contextlib
import copy

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import config
import experiments
import train
from conftest import TINY, readme_snippet
from model import GPT, GPTConfig
from sae import SparseAutoencoder

CPU = torch.device("cpu")
# Ops that legally take tensors on two devices: a cross-device copy, and the two calls of
# Module.to() that swap a parameter's data for its moved copy.
MAY_MIX = (torch.Tensor.copy_, torch.Tensor.data.__set__, torch._has_compatible_shallow_copy_type)
DEVICE_GETTER = torch.Tensor.device.__get__
CPU_AUTOCAST = torch.autocast


class DeviceMismatch(AssertionError):
    """What the real device would have raised (an AssertionError: no `except RuntimeError` hides it)."""


class PretendDevice(TorchFunctionMode):
    """Tensors "on" `device_type` ("cuda" or "mps") are CPU tensors whose storage is tagged."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device = torch.device(device_type)
        # storage address -> weak reference. Tagging the storage (not the Python object) follows
        # the data through views, `param.data = moved` and `param.grad`; the weak reference keeps
        # the address from being reused by a new storage until it is purged.
        self.on_device, self.purge_at = {}, 10_000

    def tagged(self, tensor: torch.Tensor) -> bool:
        ref = self.on_device.get(tensor.untyped_storage()._cdata)
        return ref is not None and not ref.expired()

    def tag(self, tensors) -> None:
        for tensor in tensors:
            if self.device.type == "mps" and tensor.dtype == torch.float64:
                raise DeviceMismatch(f"a float64 tensor {tuple(tensor.shape)} on mps, which has no float64")
            storage = tensor.untyped_storage()
            self.on_device[storage._cdata] = StorageWeakRef(storage)
        if len(self.on_device) > self.purge_at:
            self.on_device = {address: ref for address, ref in self.on_device.items() if not ref.expired()}
            self.purge_at = 2 * len(self.on_device) + 10_000

    def on_pretend_device(self, device) -> bool:
        """Whether a `device=` argument means the pretend device (True) or the CPU (False)."""
        device = torch.device(device)
        if device.type not in ("cpu", self.device.type):
            raise DeviceMismatch(f"a tensor placed on {device} in a run on {self.device}")
        return device.type != "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == DEVICE_GETTER:
            return self.device if self.tagged(args[0]) else CPU
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            return self.move(func, args, kwargs)
        if func in MAY_MIX:
            return func(*args, **kwargs)
        tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        on_device = [tensor for tensor in tensors if self.tagged(tensor)]
        on_cpu = [tensor for tensor in tensors if tensor.dim() > 0 and not self.tagged(tensor)]
        if on_device and on_cpu:
            shapes = lambda group: ", ".join(str(tuple(tensor.shape)) for tensor in group)
            raise DeviceMismatch(f"{func.__name__} mixes tensors on {self.device} ({shapes(on_device)}) with CPU tensors ({shapes(on_cpu)})")
        if on_device and func is torch.Tensor.numpy:
            raise DeviceMismatch(f".numpy() of a tensor on {self.device}: move it to the CPU first")
        placed = bool(on_device)
        if kwargs.get("device") is not None:  # a factory: the tensor lands where device= says
            placed, kwargs = self.on_pretend_device(kwargs["device"]), kwargs | {"device": CPU}
        generator = kwargs.get("generator")
        if generator is not None and (generator.device.type == self.device.type) != placed:
            raise DeviceMismatch(f"{func.__name__} samples a {'tensor on ' + str(self.device) if placed else 'CPU tensor'} with a {generator.device} generator")
        out = func(*args, **kwargs)
        if placed:
            self.tag(leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor))
        return out

    def move(self, func, args, kwargs):
        """tensor.to(...) and tensor.cpu(). A move between the CPU and the device copies the data
        into a new storage, tagged or not; the original stays where it was."""
        source, dtype = args[0], None
        if func is torch.Tensor.cpu:
            target = CPU
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):  # tensor.to(other): other's device and dtype
            target, dtype = self.device if self.tagged(args[1]) else CPU, args[1].dtype
        else:
            target, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        was_placed = self.tagged(source)
        placed = was_placed if target is None else self.on_pretend_device(target)
        result = source if dtype is None else source.to(dtype)
        if placed != was_placed and result.untyped_storage()._cdata == source.untyped_storage()._cdata:
            result = result.clone()
        if placed:
            self.tag([result])
        return result


class PretendGenerator(torch.Generator):
    """torch.Generator(device=...) under `pretend`: a CPU generator that reports the device it was made for."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls)
        generator.made_for = torch.device(device)
        return generator

    @property
    def device(self) -> torch.device:
        return self.made_for


@contextlib.contextmanager
def pretend(device_type: str, monkeypatch):
    """Run as on `device_type`: it is available, torch.Generator(device=...) makes a PretendGenerator,
    autocast on it is autocast on the CPU (so a CUDA run computes in bfloat16, as on CUDA), the
    torch.cuda / torch.mps calls of the pipeline do nothing, and --bench's memory runs stay in this
    process (a spawned child would escape the mode). Yields the PretendDevice mode."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device_type == "cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device_type == "mps")
    monkeypatch.setattr(torch, "Generator", PretendGenerator)
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: CPU_AUTOCAST("cpu", *args, **kwargs))
    for module, name, result in ((torch.cuda, "synchronize", None), (torch.mps, "synchronize", None), (torch.cuda, "reset_peak_memory_stats", None),
                                 (torch.cuda, "memory_allocated", 0), (torch.cuda, "max_memory_allocated", 2**20)):
        monkeypatch.setattr(module, name, lambda *args, result=result: result)
    monkeypatch.setattr(experiments, "in_child_process", lambda function, *args: function(*args))
    with PretendDevice(device_type) as mode:
        yield mode


def test_the_pretend_device_follows_models_gradients_and_optimizer_state(monkeypatch):
    with pretend("cuda", monkeypatch) as mode:
        model = torch.nn.Linear(4, 2).to(torch.device("cuda"))  # Module.to swaps each parameter's data
        optimizer = torch.optim.AdamW(model.parameters())
        x = torch.ones(3, 4).to("cuda")
        model(x).sum().backward()
        optimizer.step()
        assert mode.tagged(model.weight) and mode.tagged(model.weight.grad) and model.weight.device.type == "cuda"
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


def test_the_readme_snippet_runs_unchanged_with_every_input_on_a_device_and_the_cache_on_the_cpu(monkeypatch):
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
            "torch": torch, "sae": sae,
            "lm": lambda ids: policy(ids, hidden_layer=-1), "reference_lm": lambda ids: reference(ids, hidden_layer=-1),
            "input_ids": input_ids.to(cuda), "response_mask": response_mask.to(cuda), "row_ids": torch.arange(4, device=cuda),
        }
        exec(readme_snippet(), scope)
        assert not mode.tagged(scope["cache"]["feature_values"])  # the cache lives on the CPU
        assert mode.tagged(scope["reference_pooled"]) and mode.tagged(scope["losses"])
        assert all(mode.tagged(p.grad) for p in policy.parameters())


# The tiny pipeline, shrunk further: device bugs need each code path once, not learning.
SMALL = TINY + [
    "--n_docs", "200", "--pretrain_steps", "4", "--sae_tokens", "2000", "--sae_eval_tokens", "500", "--sae_steps", "4",
    "--n_pairs", "40", "--n_test_pairs", "16", "--pref_steps", "3", "--n_eval_prompts", "4", "--max_new_tokens", "8", "--log_every", "2",
]


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread: on this shared 2-core machine, 12 s instead of 110 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_every_stage_the_feature_report_every_method_and_bench_run_on_a_pretend_device(device, tmp_path, monkeypatch, one_thread):
    argv = SMALL + ["--out_dir", str(tmp_path), "--device", device]
    with pretend(device, monkeypatch):
        train.main(argv)
        train.main(argv + ["--stage", "features"])
        for method in config.METHODS:
            for stage in ("prefer", "eval"):  # eval too: it runs each method's loss and the drift
                train.main(argv + ["--stage", stage, "--method", method])
        experiments.main(argv + ["--bench", "--bench_steps", "2"])
    assert all((tmp_path / name).exists() for name in ("results.json", "features.txt", "bench.json"))
