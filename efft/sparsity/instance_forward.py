"""Instance-level ``module.forward`` replacements that a copy of the model follows.

efft.sparsity changes what some modules do by putting a callable in ``module.forward`` (the module's
``__call__`` then runs it instead of the class's forward). A closure there keeps the module and its
state in closure cells, which ``copy.deepcopy`` does not copy: the copy of the model would keep
calling the original's modules, with the original's weights, silently (a reference model made
with ``deepcopy`` for DPO, an EMA copy, an evaluation copy). Pickle refuses closures altogether.

:class:`InstanceForward` keeps them as attributes instead, so deepcopy maps them onto the copy's
modules (through its memo) and pickle stores them like any other object. Subclasses implement
``forward``; :meth:`inner` calls what they wrap: an instance-level forward installed before (another
wrapper) or the class's forward looked up at call time, so a later class swap
(efft.sparsity.recompute) still takes effect.
"""
from __future__ import annotations

import abc
from typing import Any

from torch import nn

__all__ = ["InstanceForward", "remove_wrapper"]


class InstanceForward(abc.ABC):
    """``module.forward`` = this object; ``forward(*args, **kwargs)`` is what the module now does."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.own = module.__dict__.get("forward")  # an instance-level forward installed before this one

    def inner(self, *args, **kwargs) -> Any:
        """The forward this one wraps."""
        if self.own is not None:
            return self.own(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @abc.abstractmethod
    def forward(self, *args, **kwargs) -> Any:
        """What the module does instead."""

    def __call__(self, *args, **kwargs) -> Any:
        return self.forward(*args, **kwargs)

    def install(self) -> "InstanceForward":
        self.module.forward = self
        return self

    def installed(self) -> bool:
        """Whether this wrapper is in the module's chain of instance forwards."""
        cur = self.module.__dict__.get("forward")
        while isinstance(cur, InstanceForward):
            if cur is self:
                return True
            cur = cur.own
        return False

    def restore(self) -> None:
        """Take this wrapper out of the module's chain, wherever it sits: on top (the module's forward
        becomes what it wrapped) or under another wrapper (that one now calls what it wrapped)."""
        outer, cur = None, self.module.__dict__.get("forward")
        while isinstance(cur, InstanceForward):
            if cur is self:
                if outer is not None:
                    outer.own = self.own
                elif self.own is not None:
                    self.module.forward = self.own
                else:
                    del self.module.forward
                return
            outer, cur = cur, cur.own


def remove_wrapper(module: nn.Module, cls: type) -> bool:
    """Take the outermost ``cls`` wrapper out of ``module``'s chain of instance forwards (see
    :meth:`InstanceForward.restore`). False if there is none."""
    cur = module.__dict__.get("forward")
    while isinstance(cur, InstanceForward):
        if isinstance(cur, cls):
            cur.restore()
            return True
        cur = cur.own
    return False
