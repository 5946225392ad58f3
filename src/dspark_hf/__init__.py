"""dspark_hf: DSpark speculative decoding for Hugging Face transformers."""

from .compat import check_transformers_version

check_transformers_version()

from transformers import AutoConfig, AutoModel

from .calibration import (
    CalibrationData,
    apply_calibration,
    calibration_metrics,
    collect_calibration_rounds,
    fit_sequential_calibration,
    fit_sequential_temperature_scaling,
    threshold_sweep,
)
from .engine import DSparkEngine, EngineRequest, EngineStats, SamplingParams
from .model_card import DSparkModelCardData
from .models.dspark.configuration_dspark import DSparkDraftConfig
from .models.dspark.modeling_dspark import (
    DSparkContextCache,
    DSparkDraftModel,
    DSparkDraftOutput,
    block_attention_mask,
    block_position_ids,
    position_weights,
    select_target_features,
)
from .scheduling import (
    CostTable,
    FullBlockPolicy,
    LaggedSchedulerPolicy,
    NoSpeculationPolicy,
    PrefixSchedulerPolicy,
    StaticThresholdPolicy,
    VerificationPolicy,
    profile_cost_table,
    profile_draft_cost,
    profile_verify_cost,
    schedule_verification_lengths,
)
from .speculative import hook
from .speculative.decoding import DSparkProposer, prompt_lookup, speculative_decoding
from .speculative.round import DraftBlock, draft_block, sample_block, speculative_accept
from .speculative.stats import SpeculationStats
from .targets import choose_mask_token_id, default_target_layer_ids, draft_config_from_target

AutoConfig.register(DSparkDraftConfig.model_type, DSparkDraftConfig, exist_ok=True)
AutoModel.register(DSparkDraftConfig, DSparkDraftModel, exist_ok=True)
hook.install()

__version__ = "0.1.0.dev0"

__all__ = [
    "CalibrationData",
    "apply_calibration",
    "calibration_metrics",
    "collect_calibration_rounds",
    "fit_sequential_calibration",
    "fit_sequential_temperature_scaling",
    "threshold_sweep",
    "CostTable",
    "FullBlockPolicy",
    "LaggedSchedulerPolicy",
    "NoSpeculationPolicy",
    "PrefixSchedulerPolicy",
    "StaticThresholdPolicy",
    "VerificationPolicy",
    "profile_cost_table",
    "profile_verify_cost",
    "profile_draft_cost",
    "schedule_verification_lengths",
    "DSparkEngine",
    "EngineRequest",
    "EngineStats",
    "SamplingParams",
    "DSparkProposer",
    "DraftBlock",
    "SpeculationStats",
    "draft_block",
    "prompt_lookup",
    "sample_block",
    "speculative_accept",
    "speculative_decoding",
    "DSparkContextCache",
    "DSparkDraftConfig",
    "DSparkDraftModel",
    "DSparkDraftOutput",
    "DSparkModelCardData",
    "block_attention_mask",
    "block_position_ids",
    "choose_mask_token_id",
    "default_target_layer_ids",
    "draft_config_from_target",
    "position_weights",
    "select_target_features",
]
