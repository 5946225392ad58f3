"""The DSpark draft: [`DSparkDraftConfig`] and [`DSparkDraftModel`]."""

from .configuration_dspark import DSparkDraftConfig
from .modeling_dspark import (
    DSparkContextCache,
    DSparkDraftModel,
    DSparkDraftOutput,
    DSparkPreTrainedModel,
    select_target_features,
    target_hidden_state_indices,
)

__all__ = [
    "DSparkContextCache",
    "DSparkDraftConfig",
    "DSparkDraftModel",
    "DSparkDraftOutput",
    "DSparkPreTrainedModel",
    "select_target_features",
    "target_hidden_state_indices",
]
