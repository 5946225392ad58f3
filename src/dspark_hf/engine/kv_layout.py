"""The ragged KV layout of a [`DSparkEngine`] batch: the target's `DynamicCache`, the draft's cache
(`DSparkContextCache` or `Eagle3Cache`) and a slot-validity mask, all sharing one physical layout, plus an optional
per-row draft state (an EAGLE-3 draft's output at its last context slot).

Slot j of a row holds the same token in both caches. Every round appends slots to every row; slots of padding and of
rejected tokens stay in the caches but are False in `valid`, and since the mask is passed with every forward, no
later query ever attends to them ("holes"). Causality is by physical slot and RoPE positions are logical (per-row
position ids), so holes change nothing but memory. [`RaggedKVLayout.compact`] removes them; rows join by
[`RaggedKVLayout.merge`] (left-padded to the common width) and leave by [`RaggedKVLayout.select`].
"""

import copy
from collections.abc import Callable

import torch
from transformers import DynamicCache

from .. import compat
from ..models.shared import DraftKVCache


class RaggedKVLayout:
    """Target KV cache, draft context cache and slot validity of the active rows, sharing one physical layout.

    Cached tensors are `(R, heads, P, head_dim)`; `valid` is `(R, P)`. Slot j of a row holds the same token in both
    caches.

    Args:
        cache: the target's cache.
        draft_cache: the draft's context cache, or None for plain decoding.
        valid: `(R, P)`, which slots hold a verified token.
        draft_state: `(R, ...)` per-row draft state that moves with its row (not with slots), or None.
    """

    def __init__(
        self,
        cache: DynamicCache,
        draft_cache: DraftKVCache | None,
        valid: torch.BoolTensor,
        draft_state: torch.Tensor | None = None,
    ):
        self.cache = cache
        self.draft_cache = draft_cache
        self.valid = valid
        self.draft_state = draft_state

    @property
    def width(self) -> int:
        """P, the number of physical slots per row."""
        return self.valid.shape[1]

    def _tensor_lists(self) -> list[list[torch.Tensor]]:
        lists = list(compat.cache_layer_tensors(self.cache))
        if self.draft_cache is not None:
            lists += [self.draft_cache.keys, self.draft_cache.values]
        return lists

    def _assign(self, lists: list[list[torch.Tensor]]) -> None:
        compat.set_cache_layer_tensors(self.cache, lists[0], lists[1])
        if self.draft_cache is not None:
            self.draft_cache.keys, self.draft_cache.values = list(lists[2]), list(lists[3])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies `fn` to every cached tensor."""
        self._assign([[fn(t) for t in tensors] for tensors in self._tensor_lists()])

    def merge(self, other: "RaggedKVLayout") -> None:
        """Appends `other`'s rows, left-padding both to the common width."""
        width = max(self.width, other.width)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self._assign(
            [
                [torch.cat([pad(a, 2), pad(b, 2)]) for a, b in zip(mine, theirs, strict=True)]
                for mine, theirs in zip(self._tensor_lists(), other._tensor_lists(), strict=True)
            ]
        )
        self.valid = torch.cat([pad(self.valid, 1), pad(other.valid, 1)])
        if self.draft_state is not None:
            self.draft_state = torch.cat([self.draft_state, other.draft_state])

    def select(self, rows: torch.LongTensor) -> None:
        """Keeps `rows` (in that order)."""
        self.map(lambda t: t[rows])
        self.valid = self.valid[rows]
        if self.draft_state is not None:
            self.draft_state = self.draft_state[rows]
        self.trim()

    def take(self, rows: torch.LongTensor) -> "RaggedKVLayout":
        """A new layout holding copies of `rows` (in that order); this one is left as it is."""
        tensors = self._tensor_lists()
        self._assign([[t[rows] for t in layer_tensors] for layer_tensors in tensors])
        try:
            state = None if self.draft_state is None else self.draft_state[rows]
            taken = RaggedKVLayout(compat.copy_cache(self.cache), copy.deepcopy(self.draft_cache), self.valid[rows], state)
        finally:
            self._assign(tensors)
        taken.trim()
        return taken

    def truncate(self, width: int, valid: torch.BoolTensor) -> None:
        """Drops every slot from `width` on (e.g. those a failed round appended) and restores `valid` `(R, width)`."""
        self.map(lambda t: t[:, :, :width])
        self.valid = valid

    def trim(self) -> None:
        """Drops leading and trailing slots that no row uses."""
        used = self.valid.any(dim=0).nonzero()
        start, end = int(used[0]), int(used[-1]) + 1
        if start > 0 or end < self.width:
            self.map(lambda t: t[:, :, start:end])
            self.valid = self.valid[:, start:end]

    def waste(self) -> float:
        """Fraction of the width that even the fullest row does not use."""
        return 1.0 - int(self.valid.sum(dim=1).max()) / self.width

    def compact(self) -> None:
        """Gathers each row's valid slots, in order, to the right end of a width of max(valid count)."""
        width = int(self.valid.sum(dim=1).max())
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, -width:]  # holes first
        index = order[:, None, :, None]
        self.map(lambda t: t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[3])))
        self.valid = self.valid.gather(1, order)


__all__ = ["RaggedKVLayout"]
