"""impl="auto"|"triton"|"torch" dispatch shared by every op in efft.ops.

Triton is imported lazily (``import efft.ops`` must work without a GPU and without triton). The
kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 when asked for explicitly.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

IMPLS = ("auto", "triton", "torch")
_warned: set = set()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_impl(impl: str, op: str, device: torch.device, reason: Optional[str]) -> str:
    """Return "triton" or "torch".

    ``reason`` is the op's own verdict on the inputs: None when its kernel can take them, otherwise a
    sentence saying what it expected. "triton" raises on any obstacle; "auto" uses Triton only on
    CUDA and falls back to the reference (one warning per op and reason) when the kernel cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}; got {impl!r}")
    if impl == "torch":
        return "torch"
    device = torch.device(device)
    if device.type == "cuda":
        obstacle = None if triton_available() else "triton is not installed"
    elif device.type == "cpu" and interpreter():
        obstacle = None if triton_available() else "triton is not installed"
    else:
        obstacle = (f"the Triton kernel runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                    f"got {device.type} tensors")
    if obstacle is None:
        obstacle = reason
    if impl == "triton":
        if obstacle is not None:
            raise ValueError(f"{op}(impl='triton'): {obstacle}")
        return "triton"
    # auto: CPU without the interpreter is the normal reference path, no warning
    if device.type != "cuda":
        return "torch"
    if obstacle is not None:
        warn_once(f"{op}:{obstacle}", f"{op}: falling back to the torch reference: {obstacle}")
        return "torch"
    return "triton"
