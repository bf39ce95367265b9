"""Bytes that autograd keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor packed for backward inside the context is seen once per storage (views of one buffer
count once, as the memory they pin), and storages of the given parameters are left out, so the
number is the activation memory a forward adds, not the weights it points at.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


class SavedTensorBytes:
    """``with SavedTensorBytes(params=model.parameters()) as m: loss = f(x)`` then ``m.bytes``."""

    def __init__(self, params: Optional[Iterable[torch.Tensor]] = None):
        self._skip = set()
        for p in params or ():
            try:
                self._skip.add(p.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                pass
        self._seen: dict[int, int] = {}
        self.param_bytes = 0
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            size = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, size = id(t), t.numel() * t.element_size()
        if key in self._skip:
            return t
        if key not in self._seen:
            self._seen[key] = size
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())
