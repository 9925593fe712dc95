"""Count the calls that make the host wait for the device, on any device (CPU included).

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` catches every synchronizing call, but only
on a GPU. :class:`HostSyncCounter` is its portable stand-in for tests: a
:class:`~torch.overrides.TorchFunctionMode` that records the tensor calls which, on a GPU,
copy a device result to the host (``item``, ``tolist``, ``bool(t)``, ``float(t)``, ``.cpu()``,
``nonzero``, boolean-mask indexing, ...), made from the training code, Kornia or Accelerate.
Calls from torch's own Python code are left out: there they act on host tensors (Adam's step
counter is a CPU tensor whose ``item()`` waits on nothing), and the GPU check catches the
rest.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# Calls that wait for a device result on CUDA.
SYNCING = {T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.__format__,
           T.cpu, T.numpy, T.nonzero, torch.nonzero, torch.argwhere, torch.masked_select,
           T.masked_select, torch.unique, T.unique}
# Indexing waits only with a boolean mask (its nonzero count sets the output shape).
INDEXING = {T.__getitem__, T.__setitem__}
# Code whose calls are counted: the training code and the libraries it drives on the device.
WATCHED = ("brainseg_dist", "kornia", "accelerate", "benchmarks", "tests")


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_host(func, args: tuple, kwargs: dict) -> bool:
    if func not in (T.to, T.copy_):
        return False
    target = args[1] if len(args) > 1 else kwargs.get("device")
    if func is T.copy_:  # copy_(dst, src): the destination is the host
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return (isinstance(target, str | torch.device) and torch.device(target).type == "cpu"
            and args[0].device.type != "cpu")


# torch's own dispatch frames between a call and the mode (Tensor dunders, overrides).
_DISPATCH = ("overrides.py", "_tensor.py")


def _caller():
    """The frame that made the tensor call, above torch's dispatch frames."""
    frame = sys._getframe(2)
    while frame.f_back is not None and (frame.f_code.co_filename.endswith(_DISPATCH)
                                        and "torch" in Path(frame.f_code.co_filename).parts):
        frame = frame.f_back
    return frame


class HostSyncCounter(TorchFunctionMode):
    """Counts syncing calls made from watched code while the mode is active.

    ``count`` is the running total; ``calls`` counts ``"name at file:line"`` strings, so a
    failing assertion says where the sync was.

    Args:
        watched: directory names; a call counts when its caller's file path has one of them
            (default :data:`WATCHED`).
        host_code: ``(file path suffix, function name)`` of code that works on host tensors
            on any device (e.g. the sampler's permutation from a CPU generator); not counted.
    """

    def __init__(self, watched: tuple[str, ...] = WATCHED,
                 host_code: tuple[tuple[str, str], ...] = ()):
        super().__init__()
        self.watched, self.host_code = watched, host_code
        self.count = 0
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in SYNCING or (func in INDEXING and _bool_index(args))
                or _to_host(func, args, kwargs)):
            caller = _caller()
            path = Path(caller.f_code.co_filename)
            code = caller.f_code
            host = any(code.co_filename.endswith(f) and code.co_name == name
                       for f, name in self.host_code)
            if not host and any(part in self.watched for part in path.parts):
                self.count += 1
                name = getattr(func, "__name__", str(func))
                self.calls[f"{name} at {'/'.join(path.parts[-2:])}:{caller.f_lineno}"] += 1
        return func(*args, **kwargs)
