"""Run megatron-core on CPU with gloo (tests and the CPU demo only).

megatron-core assumes CUDA in a handful of places: factory calls with
``device="cuda"``, ``Tensor.cuda()``, ``torch.cuda.current_device()``, the
CUDA RNG state forked by the model-parallel RNG tracker, the global memory
buffer, and optimizer/grad-clipping checks on ``Tensor.type()`` strings.
:func:`enable` redirects each of them to the CPU inside this process.

GPU runs never import this module. :func:`enable` is idempotent and only
patches; it does not change numerics of any operation that already ran on CPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable", "is_enabled", "CpuDeviceMode"]

_STATE: dict = {"enabled": False, "mode": None}


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch function call.

    ``Tensor.cuda()`` becomes a no-op, ``.to("cuda")`` a CPU move, factory
    ``device="cuda"`` a CPU allocation, and ``Tensor.type()`` answers with the
    ``torch.cuda.*`` name that megatron-core's optimizer asserts on.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


def _patch_cuda_queries() -> None:
    import torch.cuda

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    # megatron-core 0.19.0 waits on the current stream for CUDA-graph events before every
    # gradient reduction (0.17.0 on, only when reductions overlap); on CPU there is one
    # stream and no event.
    torch.cuda.current_stream = lambda *a, **k: _CpuStream()


class _CpuStream:
    """What megatron-core asks of ``torch.cuda.current_stream()`` on CPU: nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_megatron() -> None:
    from megatron.core import utils
    from megatron.core.tensor_parallel import random as mp_random

    # The RNG tracker forks "CUDA" state per region; on CPU the default
    # generator's state stands in for it.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = 1
        for d in tensor_shape:
            required *= d
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required:
            buf = torch.empty(required, dtype=dtype, device="cpu")
            self.buffer[(name, dtype)] = buf
        return buf[:required].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor


def enable() -> None:
    """Patch this process so megatron-core runs on CPU. Safe to call twice."""
    if _STATE["enabled"]:
        return
    import warnings

    # The mode sees megatron-core read ``.grad`` of non-leaf views (harmless, once per step).
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf")
    _patch_cuda_queries()
    _patch_megatron()
    mode = CpuDeviceMode()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)


def is_enabled() -> bool:
    """Whether :func:`enable` ran in this process."""
    return _STATE["enabled"]
