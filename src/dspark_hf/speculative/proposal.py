"""What one round of `generate()`'s decoding loop verifies ([`Proposal`]), and what every draft family's proposer
shares ([`BlockProposer`]): the call's sampling settings, the verification policy, and reading the target features
of a verification pass."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList

from ..models.dspark.modeling_dspark import select_target_features, target_hidden_state_indices
from .round import DraftBlock

if TYPE_CHECKING:
    from ..scheduling import VerificationPolicy


@dataclass
class Proposal:
    """What one round verifies: the first `length` tokens of `block` (None when nothing is proposed)."""

    block: DraftBlock | None
    length: int
    looked_up: bool = False
    seeded: bool = False

    @property
    def confidence_logits(self) -> list[float]:
        if self.block is None or self.block.confidence_logits is None:
            return []
        return self.block.confidence_logits[0, : self.length].tolist()


class BlockProposer:
    """The part of a proposer (one sequence of `generate()`'s decoding loop) that does not depend on the draft family.

    A proposer has `longest_proposal` (the most tokens a round can propose), `observe(hidden_states, count)` (the
    target features of a pass's first `count` positions are verified) and `propose(input_ids, budget) -> Proposal`.

    Args:
        draft: an attached draft (`DSparkDraftModel` or `Eagle3DraftModel`).
        generation_config: the call's prepared generation config (`do_sample`, `eos_token_id`).
        logits_processor: the call's processors and warpers; drafted tokens are sampled after them.
        verification_policy: how many drafted tokens each round verifies from `DraftBlock.confidences` (None: all).
    """

    def __init__(
        self,
        draft,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        verification_policy: "VerificationPolicy | None" = None,
    ):
        self.draft = draft
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.policy = verification_policy
        if self.policy is not None:  # stateful policies (lagged scheduler) start each call afresh
            self.policy.reset()
        eos = generation_config.eos_token_id
        self.eos_token_ids = None if eos is None else torch.tensor(eos, device=draft.device).flatten()

    def target_features(self, hidden_states: tuple[torch.Tensor, ...], count: int) -> torch.Tensor:
        """`(1, count, m·d)` features of the draft's target layers at the first `count` positions of a target pass,
        on the draft's device."""
        layer_ids = self.draft.config.target_layer_ids
        if hidden_states is None or any(hidden_states[i] is None for i in target_hidden_state_indices(layer_ids)):
            raise ValueError("The target's outputs carry no hidden states of the draft's target layers.")
        return select_target_features(hidden_states, layer_ids)[:, :count].to(self.draft.device)

    def _verification_length(self, block: DraftBlock) -> int:
        """How many of `block`'s tokens the round verifies: all, or what the policy picks from the confidences."""
        budget = block.tokens.shape[1]
        if self.policy is None:
            return budget
        lengths = self.policy.select_lengths([block.confidences[0].tolist()], max_lengths=[budget])
        return min(budget, int(lengths[0]))


__all__ = ["BlockProposer", "Proposal"]
