"""Speculative decoding: the pieces of one round shared by every driver (`round.py`), `generate()`'s decoding loop
(`decoding.py`) with the proposer of each draft family (`DSparkProposer` there, `Eagle3Proposer` in
`eagle3_proposer.py`, their shared part in `proposal.py`), the one wrapper of `generate()` that routes a DSpark or
EAGLE-3 assistant to it (`hook.py`), and per-call statistics (`stats.py`)."""

from .decoding import (
    DEFAULT_LOOKUP_MIN_PROBABILITY,
    LOOKUP_MODES,
    DSparkGenerateOutput,
    DSparkProposer,
    prompt_lookup,
    speculative_decoding,
)
from .eagle3_proposer import Eagle3Proposer, eagle3_draft_chain
from .proposal import BlockProposer, Proposal
from .round import DraftBlock, draft_block, draw_tokens, sample_block, speculative_accept
from .stats import SpeculationStats

__all__ = [
    "BlockProposer",
    "DEFAULT_LOOKUP_MIN_PROBABILITY",
    "LOOKUP_MODES",
    "DSparkGenerateOutput",
    "DSparkProposer",
    "DraftBlock",
    "Eagle3Proposer",
    "Proposal",
    "SpeculationStats",
    "draft_block",
    "eagle3_draft_chain",
    "draw_tokens",
    "prompt_lookup",
    "sample_block",
    "speculative_accept",
    "speculative_decoding",
]
