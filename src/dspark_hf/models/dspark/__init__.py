"""The DSpark draft: [`DSparkDraftConfig`] and [`DSparkDraftModel`]."""

from .configuration_dspark import DSparkDraftConfig
from .modeling_dspark import (
    DSparkContextCache,
    DSparkDraftModel,
    DSparkDraftOutput,
    DSparkPreTrainedModel,
    block_attention_mask,
    block_position_ids,
    position_weights,
    select_target_features,
)

__all__ = [
    "DSparkContextCache",
    "DSparkDraftConfig",
    "DSparkDraftModel",
    "DSparkDraftOutput",
    "DSparkPreTrainedModel",
    "block_attention_mask",
    "block_position_ids",
    "position_weights",
    "select_target_features",
]
