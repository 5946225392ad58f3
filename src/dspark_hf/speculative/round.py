"""The pieces of one speculative round, shared by both drivers: `generate()`'s decoding loop (one sequence,
`generation.py`) and [`DSparkEngine`] (ragged batches, `engine.py`).

1. [`draft_block`]: one backbone pass over anchor + γ−1 masks per row, then [`sample_block`] left to right through
   the sequential head, each token drawn from exactly the distribution kept in [`DraftBlock.logits`].
2. [`speculative_accept`]: standard speculative sampling against the target's distributions (greedy rows are the
   special case of one-hot distributions), with residual resampling at the first rejection.

Rolling back the target's cache differs by layout: `generate()` crops its transformers cache, the engine marks
rejected slots as holes, so each driver keeps its own.
"""

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessorList

from ..models.dspark.modeling_dspark import DSparkContextCache, DSparkDraftModel
from ..models.shared import TargetBoundDraftMixin


@dataclass
class DraftBlock:
    """One drafted block.

    Args:
        tokens: `(batch, n)` drafted tokens x_1..x_n.
        logits: `(batch, n, vocab)` float32 logits each token was sampled from (after logits processors).
        confidence_logits: `(batch, n)` raw confidence-head logits, or None without a confidence head.
        confidences: `(batch, n)` calibrated conditional survival probabilities c_k, or None.
    """

    tokens: torch.LongTensor
    logits: torch.FloatTensor
    confidence_logits: torch.FloatTensor | None
    confidences: torch.FloatTensor | None

    @classmethod
    def certain(cls, tokens: torch.LongTensor, vocab_size: int) -> "DraftBlock":
        """A block of proposals made with certainty (e.g. looked up in the prompt): each position's distribution is
        one-hot at its token, so speculative sampling accepts it with the target's probability of that token."""
        logits = torch.full((*tokens.shape, vocab_size), float("-inf"), device=tokens.device)
        return cls(tokens, logits.scatter_(-1, tokens.unsqueeze(-1), 0.0), None, None)


def full_vocabulary_logits(draft: TargetBoundDraftMixin, logits: torch.Tensor) -> torch.Tensor:
    """Draft-vocabulary logits `(R, V')` → float32 logits `(R, V)` over the target's vocabulary, −inf outside the
    draft vocabulary (unchanged, as float32, when the draft has none)."""
    return draft.scatter_to_vocabulary(logits.float())


def draw_draft_token(
    logits: torch.Tensor,
    prefix_ids: torch.LongTensor,
    drafted: list[torch.LongTensor],
    logits_processor: LogitsProcessorList | None = None,
    do_sample: bool = False,
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """Draws one drafted position of every row from exactly the distribution it returns.

    Args:
        logits: `(R, V)` float32 draft logits over the full vocabulary ([`full_vocabulary_logits`]).
        prefix_ids: `(R, len)` the sequence before the drafted block, given to `logits_processor` with `drafted`.
        drafted: the block's tokens so far, `(R,)` each.
        logits_processor: transformers processors/warpers applied before drawing.
        do_sample: sample (True) or take the argmax (False).

    Returns:
        `token (R,)` and the processed logits `(R, V)` it was drawn from (kept in [`DraftBlock.logits`]).
    """
    if logits_processor:
        logits = logits_processor(torch.cat([prefix_ids, *[t.unsqueeze(-1) for t in drafted]], dim=-1), logits)
    if do_sample:
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(-1), logits
    return logits.argmax(dim=-1), logits


@torch.no_grad()
def sample_block(
    draft: DSparkDraftModel,
    hidden_states: torch.Tensor,
    anchor_ids: torch.LongTensor,
    prefix_ids: torch.LongTensor | None = None,
    logits_processor: LogitsProcessorList | None = None,
    do_sample: bool = False,
    first_tokens: torch.LongTensor | None = None,
) -> DraftBlock:
    """Samples a block left to right: p_k = softmax(process(U_k + B_k(prefix))) (paper eq. 4).

    A draft with a draft vocabulary (`draft.set_draft_vocabulary`) samples among its tokens only: the returned
    logits are −inf elsewhere, so they still are exactly the distributions the tokens were drawn from.

    Args:
        hidden_states: `(batch, n, d)` backbone states of the first n block positions.
        anchor_ids: `(batch,)` anchor tokens x_0.
        prefix_ids: `(batch, len)` the sequence so far (ending with the anchor), given to `logits_processor`.
        logits_processor: transformers processors/warpers applied to each position's logits before sampling, so
            that every drafted token is sampled from exactly the distribution returned in `DraftBlock.logits`.
        do_sample: sample (True) or take the argmax (False).
        first_tokens: `(batch,)` position 1's proposal fixed in advance (e.g. looked up earlier in the sequence), or
            −1 where it is drawn as usual. A fixed token is proposed with certainty: its returned logits are one-hot
            at it (so speculative sampling accepts it with the target's probability of it, whatever the draft thinks
            of it), its confidence is 1, and the sequential head continues the block from it.
    """
    base_logits = draft.compute_logits(hidden_states, draft_vocabulary=True).float()
    head = draft.markov_head
    head_weight = draft.sequential_head_output_weight()
    prev, state = anchor_ids, None
    prefix = anchor_ids.unsqueeze(-1) if prefix_ids is None else prefix_ids
    tokens, logits, confidence_logits = [], [], []
    for k in range(hidden_states.shape[1]):
        step_logits = base_logits[:, k]
        if head is not None:
            bias, state = head.step(prev, hidden_states[:, k], state, output_weight=head_weight)
            step_logits = step_logits + bias.float()
        if draft.confidence_head is not None:
            confidence_logits.append(draft.confidence_head(hidden_states[:, k], draft.previous_token_features(prev)))
        prev, step_logits = draw_draft_token(
            full_vocabulary_logits(draft, step_logits), prefix, tokens, logits_processor, do_sample
        )
        if k == 0 and first_tokens is not None:
            fixed = first_tokens >= 0
            prev = torch.where(fixed, first_tokens, prev)
            certain = torch.full_like(step_logits, float("-inf")).scatter_(-1, prev.unsqueeze(-1), 0.0)
            step_logits = torch.where(fixed.unsqueeze(-1), certain, step_logits)
        tokens.append(prev)
        logits.append(step_logits)
    raw = torch.stack(confidence_logits, dim=1).float() if confidence_logits else None
    confidences = None if raw is None else draft.calibrated_confidence(raw)
    if confidences is not None and first_tokens is not None:
        confidences[:, 0] = torch.where(first_tokens >= 0, 1.0, confidences[:, 0])
    return DraftBlock(
        tokens=torch.stack(tokens, dim=1),
        logits=torch.stack(logits, dim=1),
        confidence_logits=raw,
        confidences=confidences,
    )


@torch.no_grad()
def draft_block(
    draft: DSparkDraftModel,
    cache: DSparkContextCache,
    anchors: torch.LongTensor,
    positions: torch.LongTensor,
    budget: int,
    logits_processor: LogitsProcessorList | None = None,
    do_sample: bool = False,
    prefix_ids: torch.LongTensor | None = None,
    context_valid: torch.BoolTensor | None = None,
    first_tokens: torch.LongTensor | None = None,
) -> DraftBlock:
    """One backbone pass over R blocks (anchor + γ−1 masks), then left-to-right sampling of `budget` tokens each.

    Args:
        cache: the draft's context of every row, `(R, ..., P)` slots.
        anchors, positions: `(R,)` anchor tokens and their sequence positions.
        budget: tokens to sample per row (≤ γ).
        logits_processor, do_sample, prefix_ids, first_tokens: as in [`sample_block`].
        context_valid: `(R, P)` which context slots each row sees (False for holes of a ragged layout), or None
            when every row sees all of its context.
    """
    gamma = draft.config.block_size
    rows = anchors.shape[0]
    block_ids = torch.full((rows, gamma), draft.config.mask_token_id, dtype=torch.long, device=anchors.device)
    block_ids[:, 0] = anchors
    block_positions = positions.unsqueeze(-1) + torch.arange(gamma, device=anchors.device)
    attention_mask = None
    if context_valid is not None:  # block positions see their row's valid context and the whole block
        attention_mask = torch.cat(
            [
                context_valid[:, None, None, :].expand(rows, 1, gamma, context_valid.shape[1]),
                torch.ones(rows, 1, gamma, gamma, dtype=torch.bool, device=anchors.device),
            ],
            dim=-1,
        )
    hidden = draft(
        block_ids, block_positions, attention_mask=attention_mask, cache=cache, compute_logits=False
    ).hidden_states
    return sample_block(
        draft, hidden[:, :budget], anchors, prefix_ids=prefix_ids, logits_processor=logits_processor,
        do_sample=do_sample, first_tokens=first_tokens,
    )


def draw_tokens(probs: torch.Tensor, greedy: torch.BoolTensor | None = None) -> torch.LongTensor:
    """One token per row of `(R, V)` probabilities. Rows flagged in `greedy` `(R,)` hold one-hot distributions and
    take their argmax: the token a multinomial draw would return, without drawing V random numbers."""
    if greedy is None:
        return torch.multinomial(probs, num_samples=1).squeeze(-1)
    tokens = probs.argmax(dim=-1)
    sampling = ~greedy
    if bool(sampling.any()):
        tokens[sampling] = torch.multinomial(probs[sampling], num_samples=1).squeeze(-1)
    return tokens


def speculative_accept(
    target_probs: torch.Tensor,
    block: DraftBlock | None,
    lengths: torch.LongTensor,
    greedy: torch.BoolTensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Standard speculative sampling, one row per sequence.

    Args:
        target_probs: `(R, Q, V)` target distributions p after the anchor and after each drafted token.
        block: drafted tokens `(R, n)` with the logits they were sampled from, or None when nothing was drafted.
        lengths: `(R,)` verification lengths ℓ_r ≤ min(n, Q − 1).
        greedy: `(R,)` rows decoded greedily (one-hot p): their next token is an argmax, not a draw.

    Returns:
        `accepted (R,)`, the number m_r of leading drafted tokens kept, and `next_tokens (R,)`: a draw from
        norm(max(0, p − q)) at the first rejection, or from p after the last accepted token.
    """
    rows = torch.arange(target_probs.shape[0], device=target_probs.device)
    longest = int(lengths.max()) if lengths.numel() else 0
    accepted = torch.zeros_like(lengths)
    if greedy is not None and bool(greedy.all()):
        # One-hot p: a drafted token survives iff it is p's argmax, and the next token is the argmax after the last
        # survivor; the same outcome as the general case below, without q's softmax or a residual.
        choices = target_probs.argmax(dim=-1)
        if longest > 0:
            keep = block.tokens[:, :longest] == choices[:, :longest]
            keep &= torch.arange(longest, device=lengths.device) < lengths.unsqueeze(-1)
            accepted = keep.long().cumprod(dim=-1).sum(dim=-1)
        return accepted, choices[rows, accepted]
    if longest > 0:
        drafted = block.tokens[:, :longest]
        draft_probs = torch.softmax(block.logits[:, :longest].float(), dim=-1)
        p = target_probs[:, :longest].gather(-1, drafted.unsqueeze(-1)).squeeze(-1)
        q = draft_probs.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)
        # u < p/q, written without the division (q > 0: every drafted token was sampled from q).
        keep = torch.rand_like(q) * q < p
        keep &= torch.arange(longest, device=lengths.device) < lengths.unsqueeze(-1)
        accepted = keep.long().cumprod(dim=-1).sum(dim=-1)
        rejected = accepted < lengths
        p_next = target_probs[rows, accepted]
        residual = (p_next - draft_probs[rows, accepted.clamp(max=longest - 1)]).clamp(min=0)
        use_residual = rejected & (residual.sum(dim=-1) > 0)  # an all-zero residual is only float noise when p ≈ q
        next_probs = torch.where(use_residual.unsqueeze(-1), residual, p_next)
    else:
        next_probs = target_probs[rows, accepted]
    return accepted, draw_tokens(next_probs, greedy)
