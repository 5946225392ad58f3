"""What [`DSparkEngine`] does with its draft, per draft family: start a joining batch's draft context at prefill,
draft a round's tokens over the ragged batch, and extend the context with a verification pass's features.

- [`DSparkDrafter`]: the draft's context at slot j is the target feature of that slot's token; a round is one
  backbone pass over anchor + γ−1 masks per row ([`draft_block`]).
- [`Eagle3Drafter`]: the draft's context at slot j pairs the target feature of that slot's token with the token
  after it, so a slot enters the context once the next token is known (prefill: the first sampled token; a round:
  the kept drafts and the target's next token), and every row's draft output at its last context slot travels with
  the layout (`RaggedKVLayout.draft_state`, `(R, d)`). A round is a chain of γ single-token draft steps per row
  ([`eagle3_draft_chain`]), whose keys leave the cache again before verification.

Either way the draft's cache has one slot per target-cache slot, so holes and compaction apply to both alike.
"""

import torch
from transformers.generation.logits_process import LogitsProcessorList

from ..models.dspark.modeling_dspark import DSparkContextCache, DSparkDraftModel, select_target_features
from ..models.eagle3.modeling_eagle3 import Eagle3Cache, Eagle3DraftModel
from ..speculative.eagle3_proposer import eagle3_draft_chain
from ..speculative.round import DraftBlock, draft_block
from .kv_layout import RaggedKVLayout


class DSparkDrafter:
    """A [`DSparkDraftModel`] in the engine: γ = `config.block_size`.

    Args:
        draft: the attached draft.
        max_draft_tokens: unused (the engine caps every verification length itself).
    """

    def __init__(self, draft: DSparkDraftModel, max_draft_tokens: int | None = None):
        self.draft = draft
        self.block_size = draft.config.block_size

    @property
    def has_confidences(self) -> bool:
        return self.draft.confidence_head is not None

    def features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`(R, q, m·d)` target features of a pass, on the draft's device."""
        return select_target_features(hidden_states, self.draft.config.target_layer_ids).to(self.draft.device)

    def prefill(
        self,
        hidden_states: tuple[torch.Tensor, ...],
        input_ids: torch.LongTensor,
        first_tokens: torch.LongTensor,
        position_ids: torch.LongTensor,
        valid: torch.BoolTensor,
    ) -> tuple[DSparkContextCache, None]:
        """The draft context (and per-row state) of a left-padded prefill `(R, P)` → `(cache, state)`."""
        cache = DSparkContextCache(self.draft.config.num_hidden_layers)
        self.draft.extend_context(cache, self.features(hidden_states), position_ids)
        return cache, None

    def draft_tokens(
        self,
        kv: RaggedKVLayout,
        anchors: torch.LongTensor,
        positions: torch.LongTensor,
        budget: int,
        logits_processor: LogitsProcessorList,
        do_sample: bool,
    ) -> DraftBlock:
        """`budget` tokens per row after `anchors` `(R,)` at `positions` `(R,)`."""
        return draft_block(
            self.draft, kv.draft_cache, anchors, positions, budget, logits_processor,
            do_sample=do_sample, context_valid=kv.valid,
        )

    def extend(
        self,
        kv: RaggedKVLayout,
        hidden_states: tuple[torch.Tensor, ...],
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        context_valid: torch.BoolTensor,
        accepted: torch.LongTensor,
        next_tokens: torch.LongTensor,
    ) -> None:
        """Appends a verification pass over `input_ids` `(R, Q)` at `position_ids` `(R, Q)` to the draft's context
        (one slot per verified slot; the slots past `accepted` are holes)."""
        self.draft.extend_context(kv.draft_cache, self.features(hidden_states), position_ids)


class Eagle3Drafter(DSparkDrafter):
    """An [`Eagle3DraftModel`] in the engine: γ = `max_draft_tokens`, default `config.ttt_length`."""

    def __init__(self, draft: Eagle3DraftModel, max_draft_tokens: int | None = None):
        self.draft = draft
        self.block_size = max_draft_tokens or draft.config.ttt_length

    @property
    def has_confidences(self) -> bool:
        return True  # the draft's probabilities of its tokens

    def _context_step(
        self,
        cache: Eagle3Cache,
        hidden_states: tuple[torch.Tensor, ...],
        next_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        context_valid: torch.BoolTensor | None,
        new_valid: torch.BoolTensor,
    ) -> torch.Tensor:
        """One context step over q new slots: features of a pass, the tokens after them `(R, q)`, their positions
        `(R, q)`; a new slot sees the valid earlier slots, the valid new slots up to itself, and itself (so padding
        rows stay finite). Returns the outputs `(R, q, d)`."""
        rows, q = next_ids.shape
        device = next_ids.device
        causal = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        own = torch.eye(q, dtype=torch.bool, device=device)
        new = (causal & new_valid[:, None, :]) | own
        keys = new if context_valid is None else torch.cat([context_valid[:, None, :].expand(rows, q, -1), new], -1)
        out = self.draft(
            next_ids, position_ids=position_ids, target_hidden_states=self.features(hidden_states), cache=cache,
            attention_mask=keys.unsqueeze(1), compute_logits=False,
        )
        return out.hidden_states

    def prefill(self, hidden_states, input_ids, first_tokens, position_ids, valid) -> tuple[Eagle3Cache, torch.Tensor]:
        cache = Eagle3Cache(self.draft.config.num_hidden_layers)
        next_ids = torch.cat([input_ids[:, 1:], first_tokens.unsqueeze(-1)], dim=1)
        outputs = self._context_step(cache, hidden_states, next_ids, position_ids, None, valid)
        return cache, outputs[:, -1]  # the prompts end at the last slot (left padding)

    def draft_tokens(self, kv, anchors, positions, budget, logits_processor, do_sample) -> DraftBlock:
        return eagle3_draft_chain(
            self.draft, kv.draft_cache, kv.draft_state.unsqueeze(1), positions, budget,
            prefix_ids=anchors.unsqueeze(-1), logits_processor=logits_processor, do_sample=do_sample,
            context_valid=kv.valid,
        )

    def extend(self, kv, hidden_states, input_ids, position_ids, context_valid, accepted, next_tokens) -> None:
        rows, width = input_ids.shape
        offsets = torch.arange(width, device=input_ids.device)
        next_ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(rows, 1)], dim=1)
        next_ids = next_ids.scatter(1, accepted.unsqueeze(-1), next_tokens.unsqueeze(-1))
        outputs = self._context_step(
            kv.draft_cache, hidden_states, next_ids, position_ids, context_valid,
            offsets <= accepted.unsqueeze(-1),
        )
        kv.draft_state = outputs[torch.arange(rows, device=outputs.device), accepted.to(outputs.device)]


def make_drafter(draft: DSparkDraftModel | Eagle3DraftModel, max_draft_tokens: int | None = None) -> DSparkDrafter:
    """The engine's drafter of `draft`'s family."""
    if isinstance(draft, Eagle3DraftModel):
        return Eagle3Drafter(draft, max_draft_tokens)
    if isinstance(draft, DSparkDraftModel):
        return DSparkDrafter(draft, max_draft_tokens)
    raise TypeError(f"DSparkEngine drafts with a DSparkDraftModel or an Eagle3DraftModel, got {type(draft).__name__}.")


__all__ = ["DSparkDrafter", "Eagle3Drafter", "make_drafter"]
