"""EAGLE-3 drafting for speculative decoding: the γ-step draft chain shared by `generate()`'s decoding loop and
[`DSparkEngine`] ([`eagle3_draft_chain`]), and the loop's proposer for an EAGLE-3 draft ([`Eagle3Proposer`]).

The draft's context at position j is the pair (target feature F_j, token x_{j+1}). After a verification pass that
keeps m drafted tokens, the anchor's and the kept tokens' features are paired with the tokens after them (the kept
drafts and the target's next token) and appended by one `context_step`; its last output starts the next chain.
A chain draws token 1 from that output's logits and token k+1 from the logits of `draft_step` k, each from exactly
the distribution kept in [`DraftBlock.logits`]; its keys and values leave the draft's cache before verification
(the verified tokens re-enter it with the target's features).
"""

from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList

from ..models.eagle3.modeling_eagle3 import Eagle3Cache, Eagle3DraftModel
from .proposal import BlockProposer, Proposal
from .round import DraftBlock, draw_draft_token, full_vocabulary_logits

if TYPE_CHECKING:
    from ..scheduling import VerificationPolicy


@torch.no_grad()
def eagle3_draft_chain(
    draft: Eagle3DraftModel,
    cache: Eagle3Cache,
    hidden_states: torch.Tensor,
    positions: torch.LongTensor,
    budget: int,
    prefix_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    do_sample: bool = False,
    context_valid: torch.BoolTensor | None = None,
) -> DraftBlock:
    """Drafts `budget` tokens per row by a chain of single-token draft steps; the cache is left as it was.

    Args:
        cache: the draft's context of every row, `(R, ..., P)` slots.
        hidden_states: `(R, 1, d)` the draft's output at each row's last context position.
        positions: `(R,)` the position after each row's last context position (that of the last token, x_{N−1}).
        budget: tokens to draft per row (≥ 1).
        prefix_ids: `(R, len)` the sequence so far, given to `logits_processor` (with the tokens drafted so far).
        logits_processor, do_sample: as in [`sample_block`]; every token is drawn from exactly the processed
            logits returned in `DraftBlock.logits` (−inf outside a draft vocabulary).
        context_valid: `(R, P)` which context slots each row sees (False for holes of a ragged layout), or None
            when every row sees all of its context.

    Returns:
        A [`DraftBlock`] whose `confidences` `(R, budget)` are the draft's own probabilities of its tokens (softmax
        of its logits before the processors) and `confidence_logits` their log-odds.
    """
    rows, context_length = hidden_states.shape[0], cache.get_seq_length()
    step_logits = draft.compute_logits(hidden_states[:, -1], draft_vocabulary=True)
    tokens, logits, probabilities = [], [], []
    try:
        for k in range(budget):
            raw = full_vocabulary_logits(draft, step_logits)
            token, processed = draw_draft_token(raw, prefix_ids, tokens, logits_processor, do_sample)
            probabilities.append(torch.softmax(raw, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1))
            tokens.append(token)
            logits.append(processed)
            if k + 1 == budget:
                break
            mask = None
            if context_valid is not None:  # the row's valid context and its own chain so far
                mask = torch.cat([context_valid, context_valid.new_ones(rows, k + 1)], dim=1)[:, None, None, :]
            step = draft(
                token.unsqueeze(-1), position_ids=(positions + k).unsqueeze(-1), hidden_states=hidden_states,
                cache=cache, attention_mask=mask, draft_vocabulary=True,
            )
            hidden_states, step_logits = step.hidden_states, step.logits[:, -1]
    finally:
        cache.crop(context_length)
    confidences = torch.stack(probabilities, dim=1)
    return DraftBlock(
        tokens=torch.stack(tokens, dim=1),
        logits=torch.stack(logits, dim=1),
        confidence_logits=torch.logit(confidences, eps=1e-6),
        confidences=confidences,
    )


class Eagle3Proposer(BlockProposer):
    """Chooses the tokens each round verifies for one sequence with an EAGLE-3 draft, and keeps the draft's context.

    [`observe`] holds a pass's verified target features until [`propose`] knows the tokens after them; `propose`
    appends them to the draft's context with one `context_step`, then drafts up to γ tokens ([`eagle3_draft_chain`]).
    The number verified is chosen by `verification_policy` from the draft's probabilities of its tokens (None: all).

    Args:
        draft: an attached [`Eagle3DraftModel`].
        generation_config, logits_processor, verification_policy: as for [`BlockProposer`]. Prompt lookup
            (`prompt_lookup_num_tokens`) is refused.
        max_draft_tokens: γ, the tokens drafted per round (default `draft.config.ttt_length`, the steps it was
            trained for; any γ ≥ 1 is lossless).
    """

    def __init__(
        self,
        draft: Eagle3DraftModel,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        verification_policy: "VerificationPolicy | None" = None,
        max_draft_tokens: int | None = None,
    ):
        if generation_config.prompt_lookup_num_tokens:
            raise ValueError(
                "Prompt lookup (prompt_lookup_num_tokens) is not supported with an EAGLE-3 draft; unset it, or use a "
                "DSparkDraftModel, whose proposer combines lookup and drafting."
            )
        if max_draft_tokens is not None and max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1 (drop the draft for plain decoding), got {max_draft_tokens}.")
        super().__init__(draft, generation_config, logits_processor, verification_policy)
        self.num_draft_tokens = max_draft_tokens or draft.config.ttt_length
        self.cache = Eagle3Cache(draft.config.num_hidden_layers)
        self.context_length = 0
        self._pending: list[torch.Tensor] = []

    @property
    def longest_proposal(self) -> int:
        """The most tokens a round can propose (γ)."""
        return self.num_draft_tokens

    def observe(self, hidden_states: tuple[torch.Tensor, ...], count: int) -> None:
        """Holds the target features of the first `count` positions of a target pass for the draft's context (the
        tokens they pair with are known at the next [`propose`])."""
        self._pending.append(self.target_features(hidden_states, count))

    def propose(self, input_ids: torch.LongTensor, budget: int) -> Proposal:
        """Tokens to verify after `input_ids` `(1, length)`, at most `budget` of them."""
        if budget <= 0:
            return Proposal(None, 0)
        hidden_states = self._extend_context(input_ids)
        position = torch.tensor([input_ids.shape[1] - 1], device=self.draft.device)
        block = eagle3_draft_chain(
            self.draft, self.cache, hidden_states, position, min(self.num_draft_tokens, budget),
            prefix_ids=input_ids.to(self.draft.device), logits_processor=self.logits_processor,
            do_sample=self.do_sample,
        )
        return Proposal(block, self._verification_length(block))

    def _extend_context(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Appends the held features, paired with the tokens after their positions in `input_ids`, to the draft's
        context; returns the draft's output at the last context position `(1, 1, d)`."""
        features = torch.cat(self._pending, dim=1)
        start, count = self.context_length, features.shape[1]
        if start + count != input_ids.shape[1] - 1:
            raise RuntimeError(
                f"The draft's context would end at position {start + count - 1}, but the sequence has "
                f"{input_ids.shape[1]} tokens; observe() must see every verified position once."
            )
        device = self.draft.device
        positions = torch.arange(start, start + count, device=device).unsqueeze(0)
        out = self.draft.context_step(
            features, input_ids[:, start + 1 :].to(device), positions, cache=self.cache, compute_logits=False
        )
        self._pending, self.context_length = [], start + count
        return out.hidden_states[:, -1:]


__all__ = ["Eagle3Proposer", "eagle3_draft_chain"]
