"""Batched DSpark speculative decoding with load-aware verification: the continuous-batching engine (`engine.py`),
its requests and counters (`requests.py`), the ragged KV layout its rows share (`kv_layout.py`) and an
OpenAI-compatible HTTP server over it (`server.py`). See docs/engine.md."""

from ..speculative.sampling import RequestSamplingWarper, SamplingParams, warp_logits
from .engine import DSparkEngine
from .kv_layout import RaggedKVLayout
from .requests import FINISH_REASONS, EngineRequest, EngineStats

__all__ = [
    "FINISH_REASONS",
    "DSparkEngine",
    "EngineRequest",
    "EngineStats",
    "RaggedKVLayout",
    "RequestSamplingWarper",
    "SamplingParams",
    "warp_logits",
]
