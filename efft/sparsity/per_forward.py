"""A value that belongs to one training forward and must be seen again by its recompute.

Loss-token skipping and token elimination hand each decoder layer something about the current
batch (its label rows). Kept in one attribute, a second forward before the first one's backward
would overwrite it, and gradient checkpointing's recompute of the first forward (run in backward,
after the second forward) would then compute with the second batch's rows: wrong gradients, or a
checkpoint metadata error when the shapes differ. Two forwards before one backward is what a
DPO-style loss over separately run chosen/rejected halves does.

:class:`PerForward` ties the value to the tensor a layer gets as its input: inside the wrapped
forward (``with pf.forward(value)``) a layer takes the current value and records it under its
input's storage; a layer run outside any wrapped forward (checkpointing's recompute in backward,
which gets the same input tensor or a detached alias of it) finds the value of the forward that
made that input. Records die with their input tensor, so nothing is kept beyond the graph that
needs it; a layer called directly on a tensor no wrapped forward produced gets None. (One input
tensor fed to two forwards with different values, e.g. the same ``inputs_embeds`` reaching layer 0
twice, keeps the later value.)
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch

__all__ = ["PerForward"]


def _key(x: torch.Tensor) -> tuple:
    return x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape)


class PerForward:
    """The value of the wrapped forward running now, or of the one that produced a layer's input."""

    def __init__(self):
        self.current: Any = None
        self.depth = 0  # > 0 while a wrapped forward runs
        self._bound: dict[tuple, tuple[weakref.ref, Any]] = {}

    def __getstate__(self):  # a copy or pickle of the model starts between forwards, with no records
        return {"current": None, "depth": 0, "_bound": {}}

    @contextlib.contextmanager
    def forward(self, value: Any) -> Iterator[None]:
        """Run a wrapped forward whose layers see ``value``."""
        outer = self.current
        self.current, self.depth = value, self.depth + 1
        try:
            yield
        finally:
            self.current, self.depth = outer, self.depth - 1

    def resolve(self, x: Optional[torch.Tensor]) -> Any:
        """The value for a layer whose input is ``x``: the running forward's (recorded under ``x``
        when not None), else the value recorded for ``x`` by the forward that produced it."""
        if not torch.is_tensor(x):
            return self.current if self.depth else None
        key = _key(x)
        if self.depth:
            if self.current is not None:
                self._bind(key, x, self.current)
            return self.current
        entry = self._bound.get(key)
        if entry is None:
            return None
        ref, value = entry
        return value if ref() is not None else None

    def _bind(self, key: tuple, x: torch.Tensor, value: Any) -> None:
        bound = self._bound

        def drop(ref, key=key):  # the input died: its storage address may be reused
            if bound.get(key, (None,))[0] is ref:
                del bound[key]

        bound[key] = (weakref.ref(x, drop), value)

    def __len__(self) -> int:
        return len(self._bound)
