"""dspark_hf: DSpark speculative decoding for Hugging Face transformers.

Importing the package checks the installed transformers release, registers [`DSparkDraftConfig`] /
[`DSparkDraftModel`] and [`Eagle3DraftConfig`] / [`Eagle3DraftModel`] with the Auto classes and routes
`generate(assistant_model=<a DSparkDraftModel>)` to DSpark's decoding loop. Everything else (training, calibration,
scheduling, the engine and its server) is imported on first use of its name, as transformers does, so
`import dspark_hf` stays fast.
"""

import importlib

from .compat import check_transformers_version

check_transformers_version()

from transformers import AutoConfig, AutoModel

from .models.dspark import DSparkDraftConfig, DSparkDraftModel
from .models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from .speculative import hook

AutoConfig.register(DSparkDraftConfig.model_type, DSparkDraftConfig, exist_ok=True)
AutoModel.register(DSparkDraftConfig, DSparkDraftModel, exist_ok=True)
AutoConfig.register(Eagle3DraftConfig.model_type, Eagle3DraftConfig, exist_ok=True)
AutoModel.register(Eagle3DraftConfig, Eagle3DraftModel, exist_ok=True)
hook.install()

__version__ = "0.1.0.dev0"

# Public name -> the submodule that defines it.
_IMPORT_STRUCTURE = {
    "calibration": [
        "CalibrationData",
        "CalibrationResult",
        "apply_calibration",
        "calibrate",
        "calibration_metrics",
        "collect_calibration_rounds",
        "fit_sequential_calibration",
        "fit_sequential_temperature_scaling",
        "threshold_sweep",
    ],
    "engine": ["DSparkEngine", "EngineRequest", "EngineStats"],
    "default_draft": ["load_default_draft"],
    "engine.server": ["DSparkServer"],
    "evaluation": ["evaluate", "load_prompt_sets"],
    "model_card": ["DSparkModelCardData"],
    "models.dspark": [
        "DSparkContextCache",
        "DSparkDraftConfig",
        "DSparkDraftModel",
        "DSparkDraftOutput",
        "DSparkPreTrainedModel",
        "select_target_features",
        "target_hidden_state_indices",
    ],
    "models.eagle3": [
        "Eagle3Cache",
        "Eagle3DraftConfig",
        "Eagle3DraftModel",
        "Eagle3DraftOutput",
        "Eagle3TTTOutput",
    ],
    "scheduling": [
        "CostTable",
        "FullBlockPolicy",
        "LaggedSchedulerPolicy",
        "NoSpeculationPolicy",
        "PrefixSchedulerPolicy",
        "StaticThresholdPolicy",
        "VerificationPolicy",
        "profile_cost_table",
        "profile_draft_cost",
        "profile_verify_cost",
        "schedule_verification_lengths",
    ],
    "speculative": [
        "DSparkGenerateOutput",
        "DSparkProposer",
        "DraftBlock",
        "Eagle3Proposer",
        "SpeculationStats",
        "draft_block",
        "prompt_lookup",
        "sample_block",
        "speculative_accept",
        "speculative_decoding",
    ],
    "speculative.sampling": ["SamplingParams"],
    "targets": [
        "chat_input_ids",
        "choose_mask_token_id",
        "default_target_layer_ids",
        "draft_config_from_target",
        "load_target",
    ],
    "training.eagle3_losses": ["Eagle3LossOutput", "eagle3_loss"],
    "training": [
        "DSparkBlockBatch",
        "DSparkDataCollator",
        "DSparkTrainer",
        "DSparkTrainingArguments",
        "DraftTrainingResult",
        "TargetCacheDataset",
        "block_attention_mask",
        "block_position_ids",
        "build_blocks",
        "compute_dspark_loss",
        "dspark_loss",
        "position_weights",
        "sample_anchor_positions",
        "tokenize_conversations",
        "train",
    ],
}
_MODULE_OF = {name: module for module, names in _IMPORT_STRUCTURE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

