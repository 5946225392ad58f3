"""Batching of tokenized conversations, anchor sampling and block construction for DSpark training.

A training example is a token sequence `input_ids` with a `loss_mask` that is 1 on assistant tokens. A block
anchored at sequence position p (input token x_p) predicts x_{p+1}..x_{p+γ}; the draft sees target features of
positions < p only. Anchors are placed only where the first label x_{p+1} is an assistant token; later positions
of a block are masked once a label leaves the sequence or the assistant span.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DSparkBlockBatch", "DSparkDataCollator", "build_blocks", "sample_anchor_positions"]


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


def sample_anchor_positions(
    loss_mask: torch.Tensor,
    num_anchors: int,
    block_size: int,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Samples up to `num_anchors` distinct block anchors per sequence, uniformly among the valid ones.

    Position p is a valid anchor when its first label x_{p+1} exists and is an assistant token
    (`loss_mask[p + 1]`, and `attention_mask[p + 1]` when given). Positions of a block beyond the first are not
    required to be valid: [`build_blocks`] masks them one by one.

    Args:
        loss_mask: `(batch, seq)` 1 on assistant (label) tokens.
        num_anchors: anchors per sequence; sequences with fewer valid positions get all of them.
        block_size: γ (checked only; blocks that run past the sequence end are kept and masked per position).
        generator: a CPU `torch.Generator` making the draw reproducible.
        attention_mask: `(batch, seq)` optional padding mask.

    Returns:
        `anchors (batch, n)` sorted increasingly per row and `anchor_valid (batch, n)`, with
        `n = min(num_anchors, max valid per row)`; padding slots have anchor 0 and `anchor_valid=False`.
    """
    if num_anchors < 1 or block_size < 1:
        raise ValueError(f"num_anchors and block_size must be >= 1, got {num_anchors} and {block_size}.")
    labels_ok = loss_mask.bool()
    if attention_mask is not None:
        labels_ok = labels_ok & attention_mask.bool()
    batch, length = labels_ok.shape
    device = loss_mask.device
    candidates = torch.zeros_like(labels_ok)
    candidates[:, :-1] = labels_ok[:, 1:]  # anchor p is valid iff label p+1 is
    candidates = candidates.cpu()
    if length == 0:
        raise ValueError("sample_anchor_positions got empty sequences.")
    count = int(candidates.sum(dim=1).max().item())
    n = max(1, min(num_anchors, count))
    scores = torch.rand((batch, length), generator=generator)
    scores = torch.where(candidates, scores, torch.full_like(scores, -1.0))
    top_scores, top_index = scores.topk(n, dim=1)
    anchor_valid = top_scores >= 0
    anchors = torch.where(anchor_valid, top_index, torch.zeros_like(top_index))
    # Sort valid anchors increasingly, padding slots last.
    order_key = torch.where(anchor_valid, anchors, torch.full_like(anchors, length + 1))
    order = order_key.argsort(dim=1)
    anchors = anchors.gather(1, order).long()
    anchor_valid = anchor_valid.gather(1, order)
    return anchors.to(device), anchor_valid.to(device)


@dataclass
class DSparkBlockBatch:
    """Draft inputs and teacher-forcing targets of `num_blocks` blocks per sequence.

    Attributes:
        input_ids: `(batch, n·γ)` anchor followed by γ−1 mask tokens, per block.
        position_ids: `(batch, n·γ)` p, p+1, …, p+γ−1 per block.
        labels: `(batch, n, γ)` x_{p+k} (0 where invalid).
        prev_ids: `(batch, n, γ)` the token before each label, x_{p+k−1} (prev_ids[..., 0] is the anchor).
        valid: `(batch, n, γ)` True where the label exists, is an assistant token, and so are all earlier labels
            of the block.
        target_positions: `(batch, n, γ)` p+k−1: where the target's logits for label k live (clamped in range).
        anchors, anchor_valid: `(batch, n)` as returned by [`sample_anchor_positions`].
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    labels: torch.LongTensor
    prev_ids: torch.LongTensor
    valid: torch.BoolTensor
    target_positions: torch.LongTensor
    anchors: torch.LongTensor
    anchor_valid: torch.BoolTensor


def build_blocks(
    input_ids: torch.LongTensor,
    loss_mask: torch.Tensor,
    anchors: torch.LongTensor,
    anchor_valid: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
) -> DSparkBlockBatch:
    """Block inputs, labels and masks for the anchors of [`sample_anchor_positions`]."""
    batch, length = input_ids.shape
    offsets = torch.arange(block_size, device=input_ids.device)
    positions = anchors.unsqueeze(-1) + offsets  # (b, n, γ): p + k − 1 for k = 1..γ
    label_positions = positions + 1
    in_range = label_positions < length
    clamp = length - 1
    labels_ok = loss_mask.bool()
    if attention_mask is not None:
        labels_ok = labels_ok & attention_mask.bool()
    flat = label_positions.clamp(max=clamp).flatten(1)
    labels = input_ids.gather(1, flat).view_as(positions)
    label_is_assistant = labels_ok.gather(1, flat).view_as(positions)
    valid = in_range & label_is_assistant & anchor_valid.bool().unsqueeze(-1)
    valid = torch.cumprod(valid.long(), dim=-1).bool()
    target_positions = positions.clamp(max=clamp)
    prev_ids = input_ids.gather(1, target_positions.flatten(1)).view_as(positions)
    block_inputs = torch.full_like(prev_ids, mask_token_id)
    block_inputs[..., 0] = prev_ids[..., 0]
    return DSparkBlockBatch(
        input_ids=block_inputs.flatten(1),
        position_ids=positions.flatten(1),
        labels=torch.where(valid, labels, torch.zeros_like(labels)),
        prev_ids=prev_ids,
        valid=valid,
        target_positions=target_positions,
        anchors=anchors,
        anchor_valid=anchor_valid.bool(),
    )
