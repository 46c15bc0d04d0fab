"""A second device on a CPU-only machine, for tests that tensors land where they must.

`fake_device()` makes `torch.device("meta")` behave like an accelerator that holds data:
tensors moved there (`.to("meta")`, or made with `device="meta"`) keep their values in
host memory behind a wrapper that reports the meta device; ops on them compute on those
values and stay "on the device"; `.to("cpu")` / `.cpu()` bring them back. And, as on a
real accelerator, an op that mixes such a tensor with a host tensor (one that is not a
0-d scalar) raises, the error a CUDA run would raise, e.g. adding expert outputs that came
back on the host into a hidden state on the GPU. Copies between the two (`copy_`, `.to`)
are allowed, as they are on CUDA.

Ops on wrapped tensors work on any thread; moving a host tensor onto the fake device
needs the context manager's mode, which is per thread.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
_aten = torch.ops.aten
_CROSS_DEVICE = {_aten._to_copy.default, _aten.copy_.default}


class OnDevice(torch.Tensor):
    """A host tensor that says it lives on FAKE."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                device=FAKE, requires_grad=False)
        t.inner = inner
        return t

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_host(x) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.device.type == "cpu"


def _run(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    on_device = any(isinstance(x, OnDevice) for x in flat)
    target = kwargs.get("device")
    if target is not None and torch.device(target) == FAKE:
        kwargs = {**kwargs, "device": torch.device("cpu")}
        to_device = True
    elif target is not None:
        to_device = False
    else:
        to_device = on_device
    if on_device and func not in _CROSS_DEVICE:
        host = [x for x in flat if _is_host(x) and x.dim() > 0]
        if host:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{FAKE} and cpu! ({func})")
    unwrap = lambda x: x.inner if isinstance(x, OnDevice) else x          # noqa: E731
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if func is _aten.copy_.default:                                        # in place: return the destination
        return args[0]
    if isinstance(out, torch.Tensor) and args and isinstance(args[0], OnDevice) and out is args[0].inner:
        return args[0]
    return tree_map(_wrap, out) if to_device else out


def _wrap(x):
    if not isinstance(x, torch.Tensor) or isinstance(x, OnDevice):
        return x
    # Made outside inference mode: a view of a tensor made outside it shares that tensor's
    # version counter, which torch refuses to give an inference tensor.
    with torch.inference_mode(False):
        return OnDevice(x)


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        target = kwargs.get("device")
        if any(isinstance(x, OnDevice) for x in flat) or (target is not None and torch.device(target) == FAKE):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device():
    """Within: FAKE holds data (see the module doc). Yields the device."""
    with _Mode():
        yield FAKE


def host(t: torch.Tensor) -> torch.Tensor:
    """The values of a tensor on FAKE (or a host tensor as it is)."""
    return t.inner if isinstance(t, OnDevice) else t
