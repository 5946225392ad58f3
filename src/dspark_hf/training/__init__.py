"""Training DSpark drafts the transformers way: data preparation, collator, block geometry, losses and
`DSparkTrainer`."""

from .blocks import (
    DSparkBlockBatch,
    block_attention_mask,
    block_position_ids,
    build_blocks,
    sample_anchor_positions,
)
from .collator import DSparkDataCollator
from .data import (
    build_training_dataset,
    conversation_features,
    default_sampling_settings,
    frequent_token_ids,
    load_prompts,
    load_training_dataset,
    normalize_prompt,
    read_jsonl,
    regenerate_responses,
    tokenize_conversations,
)
from .losses import (
    DSparkLossOutput,
    DSparkMetricAccumulator,
    confidence_bce,
    cross_entropy_per_position,
    dspark_loss,
    expected_acceptance_length,
    position_weights,
    total_variation,
)
from .target_cache import TargetCacheDataset, build_target_cache, load_target_cache_info
from .trainer import (
    DSparkTrainer,
    DSparkTrainingArguments,
    compute_dspark_loss,
    run_target,
    unwrap_draft,
)

__all__ = [
    "DSparkBlockBatch",
    "DSparkDataCollator",
    "DSparkLossOutput",
    "DSparkMetricAccumulator",
    "DSparkTrainer",
    "DSparkTrainingArguments",
    "TargetCacheDataset",
    "block_attention_mask",
    "block_position_ids",
    "build_blocks",
    "build_target_cache",
    "build_training_dataset",
    "compute_dspark_loss",
    "confidence_bce",
    "conversation_features",
    "cross_entropy_per_position",
    "default_sampling_settings",
    "dspark_loss",
    "expected_acceptance_length",
    "frequent_token_ids",
    "load_prompts",
    "load_target_cache_info",
    "load_training_dataset",
    "normalize_prompt",
    "position_weights",
    "read_jsonl",
    "regenerate_responses",
    "run_target",
    "sample_anchor_positions",
    "tokenize_conversations",
    "total_variation",
    "unwrap_draft",
]
