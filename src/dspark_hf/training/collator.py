"""Batching of tokenized conversations for DSpark training: a training example is a token sequence `input_ids` with
a `loss_mask` that is 1 on assistant tokens (and, from a target cache, the target's features of every position)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DSparkDataCollator"]


@dataclass
class DSparkDataCollator:
    """Right-pads `input_ids`, `attention_mask` and `loss_mask` of a list of examples into tensors.

    Args:
        tokenizer: used only for its pad token id (its EOS id when it has no pad token); optional.
        pad_token_id: explicit pad id (overrides the tokenizer's); padding positions are masked anyway.
        max_length: truncate longer examples to this many tokens.
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Cached target features (`target_features`, `target_final_hidden`: `(S, dim)` tensors from a
    [`TargetCacheDataset`]) are zero-padded to `(batch, length, dim)` when present. Other keys of the examples
    (ids, categories, …) are dropped.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def _pad_id(self) -> int:
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        if self.tokenizer is not None:
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(self.tokenizer, name, None)
                if value is not None:
                    return int(value)
        return 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DSparkDataCollator received an empty list of examples.")
        sequences = [list(_as_list(f["input_ids"])) for f in features]
        loss_masks = [
            list(_as_list(f["loss_mask"])) if f.get("loss_mask") is not None else [1] * len(s)
            for f, s in zip(features, sequences, strict=True)
        ]
        attention = [
            list(_as_list(f["attention_mask"])) if f.get("attention_mask") is not None else [1] * len(s)
            for f, s in zip(features, sequences, strict=True)
        ]
        for s, m, a in zip(sequences, loss_masks, attention, strict=True):
            if not len(s) == len(m) == len(a):
                raise ValueError(
                    f"input_ids ({len(s)}), loss_mask ({len(m)}) and attention_mask ({len(a)}) of an example "
                    "must have the same length."
                )
        if self.max_length is not None:
            sequences = [s[: self.max_length] for s in sequences]
            loss_masks = [m[: self.max_length] for m in loss_masks]
            attention = [a[: self.max_length] for a in attention]
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self._pad_id()
        batch = {
            "input_ids": torch.full((len(sequences), length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(sequences), length), dtype=torch.long),
            "loss_mask": torch.zeros((len(sequences), length), dtype=torch.long),
        }
        for i, (s, m, a) in enumerate(zip(sequences, loss_masks, attention, strict=True)):
            n = len(s)
            batch["input_ids"][i, :n] = torch.tensor(s, dtype=torch.long)
            batch["attention_mask"][i, :n] = torch.tensor(a, dtype=torch.long)
            batch["loss_mask"][i, :n] = torch.tensor(m, dtype=torch.long) * batch["attention_mask"][i, :n]
        for name in CACHED_TARGET_KEYS:
            if features[0].get(name) is not None:
                batch[name] = _pad_cached(
                    [torch.as_tensor(f[name]) for f in features], [len(s) for s in sequences], length
                )
        return batch


CACHED_TARGET_KEYS = ("target_features", "target_final_hidden")


def _pad_cached(tensors: list[torch.Tensor], lengths: list[int], length: int) -> torch.Tensor:
    """`(S_i, dim)` cached target tensors → `(batch, length, dim)`, truncated to `lengths`, zero-padded."""
    padded = tensors[0].new_zeros((len(tensors), length, tensors[0].shape[-1]))
    for i, (tensor, n) in enumerate(zip(tensors, lengths, strict=True)):
        if tensor.shape[0] < n:
            raise ValueError(
                f"Cached target tensor of example {i} covers {tensor.shape[0]} tokens but the example has {n}; "
                "the cache was built from different data."
            )
        padded[i, :n] = tensor[:n]
    return padded


def _as_list(value) -> list:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)
