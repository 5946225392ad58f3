"""Training drafts the transformers way: data preparation, collator, block geometry, losses, the trainers
(`DSparkTrainer`, `Eagle3Trainer`, on the shared `DraftTrainer`), and [`train`], the whole pipeline in one call."""

from .base_trainer import DraftTrainer, DraftTrainingArguments
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
    vocabulary_coverage,
)
from .eagle3_losses import Eagle3LossOutput, Eagle3MetricAccumulator, eagle3_loss
from .eagle3_trainer import Eagle3Trainer, Eagle3TrainingArguments, compute_eagle3_loss
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
from .pipeline import (
    DRAFT_TYPES,
    DraftTrainingResult,
    apply_draft_vocabulary,
    build_training_draft,
    cache_target_features,
    draft_type_of,
    latest_complete_checkpoint,
    load_training_datasets,
    train,
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
    "DRAFT_TYPES",
    "DSparkBlockBatch",
    "DSparkDataCollator",
    "DSparkLossOutput",
    "DSparkMetricAccumulator",
    "DSparkTrainer",
    "DSparkTrainingArguments",
    "DraftTrainer",
    "DraftTrainingArguments",
    "DraftTrainingResult",
    "Eagle3LossOutput",
    "Eagle3MetricAccumulator",
    "Eagle3Trainer",
    "Eagle3TrainingArguments",
    "TargetCacheDataset",
    "apply_draft_vocabulary",
    "block_attention_mask",
    "block_position_ids",
    "build_blocks",
    "build_target_cache",
    "build_training_dataset",
    "build_training_draft",
    "cache_target_features",
    "compute_dspark_loss",
    "compute_eagle3_loss",
    "confidence_bce",
    "conversation_features",
    "cross_entropy_per_position",
    "default_sampling_settings",
    "draft_type_of",
    "dspark_loss",
    "eagle3_loss",
    "expected_acceptance_length",
    "frequent_token_ids",
    "vocabulary_coverage",
    "latest_complete_checkpoint",
    "load_prompts",
    "load_target_cache_info",
    "load_training_dataset",
    "load_training_datasets",
    "normalize_prompt",
    "position_weights",
    "read_jsonl",
    "regenerate_responses",
    "run_target",
    "sample_anchor_positions",
    "tokenize_conversations",
    "total_variation",
    "train",
    "unwrap_draft",
]
