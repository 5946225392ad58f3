"""Speculative decoding: the pieces of one round shared by every driver (`round.py`), `generate()`'s decoding loop
(`decoding.py`) and the one wrapper of `generate()` that routes a DSpark assistant to it (`hook.py`), and per-call
statistics (`stats.py`)."""

from .decoding import (
    DEFAULT_LOOKUP_MIN_PROBABILITY,
    LOOKUP_MODES,
    DSparkGenerateOutput,
    DSparkProposer,
    prompt_lookup,
    speculative_decoding,
)
from .round import DraftBlock, draft_block, draw_tokens, sample_block, speculative_accept
from .stats import SpeculationStats

__all__ = [
    "DEFAULT_LOOKUP_MIN_PROBABILITY",
    "LOOKUP_MODES",
    "DSparkGenerateOutput",
    "DSparkProposer",
    "DraftBlock",
    "SpeculationStats",
    "draft_block",
    "draw_tokens",
    "prompt_lookup",
    "sample_block",
    "speculative_accept",
    "speculative_decoding",
]
