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

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


CPU = torch.device("cpu")
# Ops that legally take tensors on two devices: a cross-device copy, and the two calls of
# Module.to() that swap a parameter's data for its moved copy.
MAY_MIX = (torch.Tensor.copy_, torch.Tensor.data.__set__, torch._has_compatible_shallow_copy_type)
DEVICE_GETTER = torch.Tensor.device.__get__
CPU_AUTOCAST = torch.autocast


class DeviceMismatch(AssertionError):
    """What the real device would have raised (an AssertionError: no `except RuntimeError` hides
    it)."""


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
                raise DeviceMismatch(
                    f"a float64 tensor {tuple(tensor.shape)} on mps, which has no float64"
                )
            storage = tensor.untyped_storage()
            self.on_device[storage._cdata] = StorageWeakRef(storage)
        if len(self.on_device) > self.purge_at:
            self.on_device = {
                address: ref for address, ref in self.on_device.items() if not ref.expired()
            }
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
            raise DeviceMismatch(
                f"{func.__name__} mixes tensors on {self.device} ({shapes(on_device)}) "
                f"with CPU tensors ({shapes(on_cpu)})"
            )
        if on_device and func is torch.Tensor.numpy:
            raise DeviceMismatch(f".numpy() of a tensor on {self.device}: move it to the CPU first")
        placed = bool(on_device)
        if kwargs.get("device") is not None:  # a factory: the tensor lands where device= says
            placed, kwargs = self.on_pretend_device(kwargs["device"]), kwargs | {"device": CPU}
        generator = kwargs.get("generator")
        if generator is not None and (generator.device.type == self.device.type) != placed:
            raise DeviceMismatch(
                f"{func.__name__} samples a "
                f"{'tensor on ' + str(self.device) if placed else 'CPU tensor'} "
                f"with a {generator.device} generator"
            )
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
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):
            # tensor.to(other): other's device and dtype
            target, dtype = self.device if self.tagged(args[1]) else CPU, args[1].dtype
        else:
            target, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        was_placed = self.tagged(source)
        placed = was_placed if target is None else self.on_pretend_device(target)
        result = source if dtype is None else source.to(dtype)
        if (placed != was_placed
                and result.untyped_storage()._cdata == source.untyped_storage()._cdata):
            result = result.clone()
        if placed:
            self.tag([result])
        return result


class PretendGenerator(torch.Generator):
    """torch.Generator(device=...) under `pretend`: a CPU generator that reports the device it was
    made for."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls)
        generator.made_for = torch.device(device)
        return generator

    @property
    def device(self) -> torch.device:
        return self.made_for


@contextlib.contextmanager
def pretend(device_type: str, monkeypatch):
    """Run as on `device_type`: it is available, torch.Generator(device=...) makes a
    PretendGenerator, autocast on it is autocast on the CPU (so a CUDA run computes in bfloat16, as
    on CUDA), the torch.cuda / torch.mps calls of the pipeline do nothing. Yields the PretendDevice
    mode."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device_type == "cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device_type == "mps")
    monkeypatch.setattr(torch, "Generator", PretendGenerator)
    monkeypatch.setattr(
        torch, "autocast",
        lambda device_type, *args, **kwargs: CPU_AUTOCAST("cpu", *args, **kwargs),
    )
    for module, name, result in (
        (torch.cuda, "synchronize", None), (torch.mps, "synchronize", None),
        (torch.cuda, "reset_peak_memory_stats", None), (torch.cuda, "memory_allocated", 0),
        (torch.cuda, "max_memory_allocated", 2**20),
    ):
        monkeypatch.setattr(module, name, lambda *args, result=result: result)
    with PretendDevice(device_type) as mode:
        yield mode
