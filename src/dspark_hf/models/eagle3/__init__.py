"""The EAGLE-3 draft: [`Eagle3DraftConfig`] and [`Eagle3DraftModel`]."""

from .configuration_eagle3 import Eagle3DraftConfig
from .modeling_eagle3 import (
    Eagle3Cache,
    Eagle3DecoderLayer,
    Eagle3DraftModel,
    Eagle3DraftOutput,
    Eagle3LlamaAttention,
    Eagle3PreTrainedModel,
    Eagle3TTTOutput,
    ttt_attention_mask,
)

__all__ = [
    "Eagle3Cache",
    "Eagle3DecoderLayer",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "Eagle3DraftOutput",
    "Eagle3LlamaAttention",
    "Eagle3PreTrainedModel",
    "Eagle3TTTOutput",
    "ttt_attention_mask",
]
