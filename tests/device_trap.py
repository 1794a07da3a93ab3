"""A second device for CPU tests: inside `device_trap()`, a tensor created without a device lands on `meta`.

On a GPU, a tensor the pipeline builds with torch's default device (the CPU) fails the moment it meets the CUDA
rewards. On a CPU-only machine inputs and default device are the same, so that bug is invisible. Inside the trap
every torch factory call that names no device (`torch.tensor`, `zeros`, `full`, `as_tensor` of Python data, ...)
makes a meta tensor instead, which fails the same way when it meets CPU inputs, is read, or is copied: the CPU test
then fails where the GPU run would. `as_tensor` / `tensor` of a tensor keep that tensor's device, as in torch.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

FACTORIES = _device_constructors()
KEEP_DEVICE = {torch.as_tensor, torch.asarray, torch.tensor}  # of a tensor: its own device


class _Trap(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            data = args[0] if args else kwargs.get("data")
            if not (func in KEEP_DEVICE and isinstance(data, torch.Tensor)):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_trap():
    """Within the block, tensors created without an explicit device are meta tensors (see the module docstring)."""
    with _Trap():
        yield
