"""Block geometry of DSpark training: where blocks start (anchors), what the draft sees and predicts in each.

A block anchored at sequence position p (input token x_p) predicts x_{p+1}..x_{p+γ} and sees target features of
positions < p only, exactly as at inference. Anchors are placed only where the first label x_{p+1} is an assistant
token; later positions of a block are masked once a label leaves the sequence or the assistant span. All blocks of a
batch go through the draft in one forward, with [`block_attention_mask`] keeping them apart.
"""

from dataclasses import dataclass

import torch

__all__ = [
    "DSparkBlockBatch",
    "block_attention_mask",
    "block_position_ids",
    "build_blocks",
    "sample_anchor_positions",
]


def block_attention_mask(
    anchor_positions: torch.LongTensor,
    block_size: int,
    context_length: int,
    context_mask: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """Attention mask of a forward over several blocks at once (training).

    Block `i` starts at `anchor_positions[:, i]`; its positions see context positions strictly before that anchor
    and every position of their own block (bidirectional), nothing else.

    Args:
        anchor_positions: `(batch, num_blocks)` sequence index of each block's anchor.
        block_size: γ.
        context_length: number of context positions `S` fed to the draft.
        context_mask: optional `(batch, S)`, False where a context position is padding.

    Returns:
        `(batch, 1, num_blocks * block_size, S + num_blocks * block_size)`, True where attention is allowed.
    """
    batch, num_blocks = anchor_positions.shape
    device = anchor_positions.device
    context_index = torch.arange(context_length, device=device)
    sees_context = context_index.view(1, 1, -1) < anchor_positions.unsqueeze(-1)  # (batch, blocks, S)
    if context_mask is not None:
        sees_context = sees_context & context_mask.bool().unsqueeze(1)
    sees_context = sees_context.repeat_interleave(block_size, dim=1)  # (batch, blocks * γ, S)
    block_id = torch.arange(num_blocks, device=device).repeat_interleave(block_size)
    same_block = (block_id.view(-1, 1) == block_id.view(1, -1)).expand(batch, -1, -1)
    return torch.cat([sees_context, same_block], dim=-1).unsqueeze(1)


def block_position_ids(anchor_positions: torch.LongTensor, block_size: int) -> torch.LongTensor:
    """`(batch, num_blocks)` anchors → `(batch, num_blocks * block_size)` RoPE positions p, p+1, …, p+γ−1."""
    offsets = torch.arange(block_size, device=anchor_positions.device)
    return (anchor_positions.unsqueeze(-1) + offsets).flatten(1)


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
    positions = block_position_ids(anchors, block_size).view(batch, -1, block_size)  # (b, n, γ): p + k − 1
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
