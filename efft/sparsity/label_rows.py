"""Label rows as host metadata: where a batch's loss positions are, known before it reaches the device.

Loss-token skipping gathers the positions whose shifted label is not -100. Finding them on the
device (``nonzero``) makes the host wait for the device to learn how many there are: one sync per
forward. The data collator builds the labels on the host anyway, so :class:`LabelRowsCollator`
computes the index there and puts a :class:`LabelRows` in the batch under :data:`LABEL_ROWS_KEY`.
The wrapped forward pops it before the model sees the batch; its sizes are Python ints, so the
gathers on the device need no device->host read. Each data-loader process (each DDP rank) collates
its own batches, so each carries its own index.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LABEL_ROWS_KEY = "efft_label_rows"


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels[..., 1:] padded with ``ignore_index``: the target of each position, as causal LMs shift."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class LabelRows:
    """The loss positions of a (batch, seq) batch, in the layouts the gathers need.

    ``rows``: flat indices into batch*seq (increasing) of the positions whose shifted label is not
    ignored. ``positions``: (batch, K) the same positions per batch row, for the last block's
    attention queries; rows with fewer than K are padded by repeating their last label position
    (seq-1 for a row without labels), whose outputs are dropped. ``slots``: for each entry of
    ``rows``, its flat index into batch*K. ``shape``: the (batch, seq) they index. ``span``: Python
    ints (first, last + 1) of the label positions over the whole batch, known only when built from
    host labels with ``tight`` (the collator; None otherwise: on a device it would be a host read);
    the last block's unmasked sdpa call computes the queries of that span.
    """

    __slots__ = ("rows", "positions", "slots", "shape", "span")

    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, shape: tuple[int, int],
                 span: Optional[tuple[int, int]] = None):
        self.rows, self.positions, self.slots, self.shape = rows, positions, slots, tuple(shape)
        self.span = span

    @classmethod
    def from_shifted(cls, shifted: torch.Tensor, ignore_index: int = IGNORE_INDEX, tight: bool = True) -> "LabelRows":
        """Built from shifted labels (batch, seq) where they lie.

        The ``nonzero`` that finds the rows is one host read of their count when ``shifted`` is on a
        device. ``tight`` makes K the largest per-row count (one more read: use it on host labels, as
        the collator does); otherwise K = min(count, seq), known after that one read.
        """
        if shifted.dim() != 2:
            raise ValueError(f"label rows: expected (batch, seq) labels, got shape {tuple(shifted.shape)}")
        b, s = shifted.shape
        valid = shifted != ignore_index
        where = valid.nonzero()  # (count, 2) batch row, position
        n = where.shape[0]
        counts = valid.sum(1)
        k = (int(counts.max()) if n else 0) if tight else min(n, s)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :k]  # label positions first, in order
        if k:
            last = order.gather(1, (counts - 1).clamp(0, k - 1)[:, None])
            fill = torch.where(counts[:, None] > 0, last, torch.full_like(last, s - 1))
            pad = torch.arange(k, device=shifted.device)[None, :] >= counts[:, None]
            order = torch.where(pad, fill, order)
        rank = valid.cumsum(1) - 1  # a label position's index among its row's labels
        rows = where[:, 0] * s + where[:, 1]
        slots = where[:, 0] * k + rank[where[:, 0], where[:, 1]]
        span = (int(where[:, 1].min()), int(where[:, 1].max()) + 1) if n and tight and shifted.device.type == "cpu" else None
        return cls(rows, order, slots, (b, s), span)

    @classmethod
    def from_labels(cls, labels: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    ignore_index: int = IGNORE_INDEX) -> "LabelRows":
        return cls.from_shifted(shift if shift is not None else shift_labels(labels, ignore_index), ignore_index)

    @property
    def count(self) -> int:
        """The number of label rows (host metadata: no device read)."""
        return self.rows.shape[0]

    def to(self, device=None, non_blocking: bool = False, **_: Any) -> "LabelRows":
        t = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return LabelRows(t(self.rows), t(self.positions), t(self.slots), self.shape, self.span)

    def pin_memory(self, *args: Any) -> "LabelRows":
        """DataLoader(pin_memory=True) calls this, so the copy to the device can be asynchronous."""
        p = lambda x: x.pin_memory(*args)  # noqa: E731
        return LabelRows(p(self.rows), p(self.positions), p(self.slots), self.shape, self.span)

    def __repr__(self) -> str:
        return f"LabelRows(count={self.count}, shape={self.shape}, per_row={self.positions.shape[1]})"


def with_label_rows(batch: Any) -> Any:
    """``batch`` plus its :class:`LabelRows` (a new dict) when it has host ``labels`` (ignored: -100); else unchanged."""
    if not isinstance(batch, Mapping) or LABEL_ROWS_KEY in batch:
        return batch
    shifted = batch.get("shift_labels")
    labels = batch.get("labels")
    src = shifted if torch.is_tensor(shifted) else labels
    if not torch.is_tensor(src) or src.dim() != 2 or src.device.type != "cpu":
        return batch  # no host labels: the forward finds the rows itself (one read)
    out = dict(batch)
    out[LABEL_ROWS_KEY] = LabelRows.from_labels(labels if src is labels else None, shifted if src is shifted else None)
    return out


class LabelRowsCollator:
    """A data collator wrapped so that each batch also carries its label rows (:data:`LABEL_ROWS_KEY`).

    Use it with a model prepared by ``apply_loss_tokens`` (the wrapped forward removes the key);
    ``EfftPlugin.trainer_kwargs`` installs it on Trainer's training data loader for you.
    """

    def __init__(self, collate_fn):
        if not callable(collate_fn):
            raise TypeError(f"LabelRowsCollator wraps a data collator (a callable), got {type(collate_fn).__name__}")
        self.collate_fn = collate_fn

    def __call__(self, features):
        return with_label_rows(self.collate_fn(features))
