"""Import and export of the reference (DeepSpec) EAGLE-3 checkpoint layout.

The reference has two EAGLE-3 draft classes, chosen by `architectures[0]`: `Qwen3Eagle3Model` (a full copy of the
Qwen3 target's config) and `Gemma4Eagle3Model` (the Gemma 4 target's text config, flat `gemma4_text`, with
`global_head_dim`, `num_global_key_value_heads`, `attention_k_eq_v`, ...); its `eval.py` also routes
`Eagle3DraftModel` to the Qwen3 class. On top of the target's fields the config carries `target_layer_ids`,
`ttt_length` and `step_loss_decay` (asserted by the constructors), `draft_num_hidden_layers` (read by the evaluator)
and `num_hidden_layers` = draft layers. The state dict uses our parameter names as they are and also holds copies of
the target's `embed_tokens` (unscaled) and `lm_head`. There is no draft vocabulary in the reference: ours travels as
a token-id list under the config key `dspark_hf`, which the reference ignores.

`tests/fixtures/deepspec_eagle3/` holds checkpoints written by the reference's own code (its README documents the
layout). A reference checkpoint this library cannot run as the reference does raises `ValueError` naming the field.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.eagle3.configuration_eagle3 import Eagle3DraftConfig
from .deepspec import (
    BACKBONE_FIELDS,
    MISSING,
    PASSTHROUGH_ATTRIBUTE,
    WEIGHTS_NAME,
    build_from_reference_state,
    check_exportable,
    foreign_config,
    gemma4_config_fields,
    gemma4_passthrough,
    gemma4_reference_fields,
    read_reference_config,
    read_reference_weights,
    unsupported_field,
)

# The reference's EAGLE-3 draft classes per `draft_architecture` (what an export writes as `architectures[0]`).
REFERENCE_ARCHITECTURES = {"qwen3": "Qwen3Eagle3Model", "gemma4": "Gemma4Eagle3Model"}
# `architectures[0]` values the reference's eval.py accepts → the draft family it loads them as.
_FAMILY_OF_ARCHITECTURE = {"Qwen3Eagle3Model": "qwen3", "Eagle3DraftModel": "qwen3", "Gemma4Eagle3Model": "gemma4"}
_MODEL_TYPES = {"qwen3": "qwen3", "gemma4": "gemma4_text"}
_FAMILY = "EAGLE-3"
# Fields asserted by the reference's model constructors (fixture README, section (a)).
ASSERTED_FIELDS = ("target_layer_ids", "ttt_length", "step_loss_decay")
# Fields our config shares with the reference's under the same name and meaning.
_SHARED_FIELDS = BACKBONE_FIELDS + (
    "ttt_length",
    "step_loss_decay",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Ours only, kept under this config key so that a round trip loses nothing.
_EXTRA_KEY = "dspark_hf"
_VOCABULARY_KEY = "draft_vocab_ids"
# Not passed through on import: rewritten on export, or transformers bookkeeping.
_BOOKKEEPING = (
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "draft_num_hidden_layers",
    "layer_types",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "tie_word_embeddings",
    "per_layer_config",
    _EXTRA_KEY,
)


def is_eagle3_deepspec_checkpoint(path: str | os.PathLike, **kwargs) -> bool:
    """True when `path` holds a reference-layout EAGLE-3 checkpoint (`architectures[0]` any `*Eagle3Model` or
    `Eagle3DraftModel`, model type not ours; loading one this library cannot read raises a `ValueError` that says
    why)."""
    config = foreign_config(path, Eagle3DraftConfig.model_type, **kwargs)
    if config is None:
        return False
    name = str((config.get("architectures") or [""])[0])
    return name.endswith("Eagle3Model") or name in _FAMILY_OF_ARCHITECTURE


def reference_family(flat: dict) -> str:
    """The `draft_architecture` of a reference EAGLE-3 config, from `architectures[0]` as the reference's `eval.py`
    picks its class; raises `ValueError` for any other class."""
    architectures = flat.get("architectures") or []
    name = architectures[0] if architectures else MISSING
    if name not in _FAMILY_OF_ARCHITECTURE:
        raise unsupported_field(
            "architectures[0]", name, f"the reference's EAGLE-3 classes are {sorted(_FAMILY_OF_ARCHITECTURE)}", _FAMILY
        )
    return _FAMILY_OF_ARCHITECTURE[name]


def config_from_reference(flat: dict) -> Eagle3DraftConfig:
    """Our config for a reference EAGLE-3 config; raises `ValueError` naming a field the reference requires or a
    layout this library cannot run."""
    family = reference_family(flat)
    for field in (*ASSERTED_FIELDS, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if flat.get(field) is None:
            raise unsupported_field(
                field, flat.get(field, MISSING), "the reference's model constructor requires it", _FAMILY
            )
    layers = flat["num_hidden_layers"]
    if flat.get("draft_num_hidden_layers", layers) != layers:
        raise unsupported_field(
            "draft_num_hidden_layers", flat["draft_num_hidden_layers"],
            f"it must equal num_hidden_layers={layers} (the draft's layers, as build_draft_config writes)", _FAMILY,
        )
    layer_types = flat.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise unsupported_field(
            "layer_types", layer_types, 'every draft layer must be "full_attention" (as build_draft_config writes)',
            _FAMILY,
        )
    if family == "qwen3" and not layer_types and flat.get("use_sliding_window"):
        raise unsupported_field(
            "use_sliding_window", True, "draft layers attend to the whole context (no sliding window)", _FAMILY
        )
    fields = {name: flat[name] for name in _SHARED_FIELDS if flat.get(name) is not None}
    extra = dict(flat.get(_EXTRA_KEY) or {})
    extra.pop(_VOCABULARY_KEY, None)
    fields.update(extra)
    if family == "gemma4":
        fields.update(gemma4_config_fields(flat, REFERENCE_ARCHITECTURES["gemma4"], _FAMILY))
    else:
        rope = flat.get("rope_parameters") or flat.get("rope_scaling") or {"rope_type": "default"}
        fields["rope_parameters"] = {**rope, "rope_theta": rope.get("rope_theta", flat.get("rope_theta", 10000.0))}
        fields["draft_architecture"] = "qwen3"
    try:
        config = Eagle3DraftConfig(**fields)
    except ValueError as error:
        raise ValueError(f"Reference {_FAMILY} checkpoint has a config this library cannot read: {error}") from error
    consumed = {*_SHARED_FIELDS, *_BOOKKEEPING}
    if family == "gemma4":
        kept = gemma4_passthrough(flat, consumed)
    else:
        kept = {k: v for k, v in flat.items() if k not in consumed}
    setattr(config, PASSTHROUGH_ATTRIBUTE, kept)
    return config


def reference_config(config: Eagle3DraftConfig, dtype: torch.dtype) -> dict:
    """The reference config of a draft (`draft_architecture` picks the class): the imported target fields kept in
    `config.deepspec_fields`, ours on top, and every field the reference's loaders read."""
    family = config.draft_architecture
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    kept = dict(getattr(config, PASSTHROUGH_ATTRIBUTE, None) or {})
    flat = {**kept, **{name: getattr(config, name) for name in _SHARED_FIELDS}}
    flat.update(
        architectures=[REFERENCE_ARCHITECTURES[family]],
        model_type=_MODEL_TYPES[family],
        dtype=str(dtype).removeprefix("torch."),
        tie_word_embeddings=False,
        layer_types=["full_attention"] * config.num_hidden_layers,
        draft_num_hidden_layers=config.num_hidden_layers,
    )
    if family == "gemma4":
        flat.update(gemma4_reference_fields(config, kept, rope))
        del flat["hidden_act"]
    else:
        flat.update(use_sliding_window=False, sliding_window=None, rope_parameters=rope)
    flat[_EXTRA_KEY] = {"embedding_scale": config.embedding_scale}
    return flat


def _check_eagle3_exportable(draft) -> None:
    config = draft.config
    if draft.draft_lm_head is not None:
        raise ValueError(
            "The reference's EAGLE-3 classes use the target's LM head; this draft has its own (use_draft_lm_head). "
            "Save it with layout='eagle'."
        )
    if config.draft_architecture not in REFERENCE_ARCHITECTURES:
        raise ValueError(
            f"The reference has no EAGLE-3 class of the {config.draft_architecture!r} layer design (its classes are "
            f"{sorted(REFERENCE_ARCHITECTURES.values())}); save this draft with layout='eagle'."
        )
    check_exportable(draft, REFERENCE_ARCHITECTURES)
    if config.draft_architecture == "qwen3":
        embed = draft.get_input_embeddings()
        if config.final_logit_softcapping is not None:
            raise ValueError(
                "The reference's Qwen3Eagle3Model does not soft-cap logits; this draft has final_logit_softcapping="
                f"{config.final_logit_softcapping}."
            )
        if config.embedding_scale != 1.0 or hasattr(embed, "embed_scale"):
            raise ValueError(
                "The reference's Qwen3Eagle3Model does not scale token embeddings; this draft does (embedding_scale="
                f"{config.embedding_scale} or a scaling embedding module)."
            )


def save_eagle3_deepspec_checkpoint(draft, save_directory: str | os.PathLike) -> None:
    """Writes `config.json` + `model.safetensors` in the reference EAGLE-3 layout (with embedding and LM-head
    copies); raises `ValueError` when the reference class would compute something else than `draft`."""
    _check_eagle3_exportable(draft)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = draft.own_state_dict()
    state.pop(_VOCABULARY_KEY, None)
    state["embed_tokens.weight"] = draft.get_input_embeddings().weight  # unscaled, as the reference stores it
    state["lm_head.weight"] = draft.get_output_embeddings().weight
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    flat = reference_config(draft.config, draft.dtype)
    flat[_EXTRA_KEY][_VOCABULARY_KEY] = None if draft.draft_vocab_ids is None else draft.draft_vocab_ids.tolist()
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(flat, f, indent=2, sort_keys=True)


def load_eagle3_deepspec_checkpoint(
    model_class: type[nn.Module], path: str | os.PathLike, dtype: torch.dtype | str | None = None, **kwargs
):
    """Builds a `model_class` draft (an [`Eagle3DraftModel`]) from a reference-layout EAGLE-3 checkpoint, with the
    checkpoint's embedding and LM-head copies as its own modules until a target is attached. Tensors keep their
    stored dtype unless `dtype` is given."""
    dtype = kwargs.pop("torch_dtype", None) or dtype
    flat = read_reference_config(path, **kwargs)
    config = config_from_reference(flat)
    model = build_from_reference_state(model_class, config, read_reference_weights(path, **kwargs), path, dtype, _FAMILY)
    model.set_draft_vocabulary((flat.get(_EXTRA_KEY) or {}).get(_VOCABULARY_KEY))
    return model


__all__ = [
    "ASSERTED_FIELDS",
    "REFERENCE_ARCHITECTURES",
    "config_from_reference",
    "is_eagle3_deepspec_checkpoint",
    "load_eagle3_deepspec_checkpoint",
    "reference_config",
    "save_eagle3_deepspec_checkpoint",
]
