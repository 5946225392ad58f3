"""Import and export of the reference (DeepSpec) checkpoint layout that vLLM and SGLang serve.

The reference layout is a Qwen3 config with flat DSpark fields (`block_size`, `target_layer_ids`, `mask_token_id`,
`num_anchors`, `markov_rank`, `markov_head_type`, `enable_confidence_head`, `confidence_head_with_markov`) and a
self-contained state dict that also carries copies of the target's `embed_tokens` and `lm_head`. Our module names
follow the reference keys but for the ones in `PARAMETER_RENAMES`, so conversion is a config mapping, those renames
and the two copied tensors. `tests/fixtures/deepspec/` holds checkpoints written by the reference's own code.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import cached_file

from ..models.dspark.configuration_dspark import DSparkDraftConfig

REFERENCE_ARCHITECTURE = "Qwen3DSparkModel"
WEIGHTS_NAME = "model.safetensors"
# Our head names ↔ the reference's (`vanilla` is the reference name of the first-order Markov head).
_HEAD_TO_REFERENCE = {"markov": "vanilla", "gated": "gated", "rnn": "rnn"}
_HEAD_FROM_REFERENCE = {"vanilla": "markov", "markov": "markov", "gated": "gated", "rnn": "rnn"}
# Our parameter-name prefixes → the reference's, where they differ (the reverse map is applied on import).
PARAMETER_RENAMES = {"markov_head.rnn_proj.": "markov_head.joint_proj."}
# Anchors per training sequence: only the reference's trainer reads it, but its model constructors require it. A draft
# trained here has none of its own, so it is exported with the value of the released recipes.
DEFAULT_NUM_ANCHORS = 512
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# DSpark fields with no place in the reference config, kept under this key so a round trip loses nothing.
_EXTRA_KEY = "dspark_hf"
_EXTRA_FIELDS = (
    "calibration_temperatures",
    "calibration_biases",
    "embedding_scale",
    "final_logit_softcapping",
    "ce_loss_weight",
    "tv_loss_weight",
    "confidence_loss_weight",
    "loss_position_decay",
)
# Reference fields with no meaning here: an import keeps them as config attributes (saved with the draft), so that a
# later export writes them back.
_REFERENCE_ONLY_FIELDS = ("num_anchors",)
# The draft vocabulary (`DSparkDraftModel.set_draft_vocabulary`) travels as a token-id list under _EXTRA_KEY, so the
# reference state dict holds only tensors that vLLM and SGLang know.
_VOCABULARY_KEY = "draft_vocab_ids"
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "attention_bias",
    "attention_dropout",
    "num_target_layers",
    "target_layer_ids",
    "block_size",
    "mask_token_id",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _read_config(path: str | os.PathLike, **kwargs) -> dict | None:
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    resolved = cached_file(str(path), "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if resolved is None:
        return None
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def is_deepspec_checkpoint(path: str | os.PathLike, **kwargs) -> bool:
    """True when `path` holds a reference-layout checkpoint (any `*DSparkModel` architecture)."""
    try:
        config = _read_config(path, **kwargs)
    except OSError:
        return False
    if not config or config.get("model_type") == DSparkDraftConfig.model_type:
        return False
    return any(str(a).endswith("DSparkModel") for a in config.get("architectures") or [])


def reference_config(config: DSparkDraftConfig, dtype: torch.dtype) -> dict:
    """The flat reference config of a draft."""
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    flat = {name: getattr(config, name) for name in _SHARED_FIELDS}
    flat.update(
        architectures=[REFERENCE_ARCHITECTURE],
        model_type="qwen3",
        dtype=str(dtype).removeprefix("torch."),
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        layer_types=["full_attention"] * config.num_hidden_layers,
        rope_parameters=rope,
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
        markov_rank=config.markov_rank if config.has_sequential_head else 0,
        enable_confidence_head=bool(config.confidence_head),
        confidence_head_with_markov=bool(
            config.confidence_head and config.has_sequential_head and config.confidence_head_with_markov
        ),
        num_anchors=getattr(config, "num_anchors", DEFAULT_NUM_ANCHORS),
    )
    if config.has_sequential_head:
        flat["markov_head_type"] = _HEAD_TO_REFERENCE[config.markov_head_type]
    flat[_EXTRA_KEY] = {name: getattr(config, name) for name in _EXTRA_FIELDS}
    return flat


def to_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A draft state dict with the reference's parameter names ([`PARAMETER_RENAMES`])."""
    return {_rename(key, PARAMETER_RENAMES): value for key, value in state.items()}


def from_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of [`to_reference_names`]."""
    reverse = {theirs: ours for ours, theirs in PARAMETER_RENAMES.items()}
    return {_rename(key, reverse): value for key, value in state.items()}


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _draft_vocabulary(draft) -> list[int] | None:
    return None if draft.draft_vocab_ids is None else draft.draft_vocab_ids.tolist()


def config_from_reference(flat: dict) -> DSparkDraftConfig:
    """Inverse of [`reference_config`]; raises `ValueError` on a layout this library cannot serve."""
    missing = [k for k in ("block_size", "target_layer_ids", "mask_token_id", "hidden_size", "vocab_size") if k not in flat]
    if missing:
        raise ValueError(f"Reference DSpark config is missing required field(s) {missing}.")
    rank = int(flat.get("markov_rank", 0) or 0)
    head = "none"
    if rank > 0:
        reference_head = str(flat.get("markov_head_type", "vanilla")).lower()
        if reference_head not in _HEAD_FROM_REFERENCE:
            raise ValueError(
                f"Reference markov_head_type={reference_head!r} is not supported; supported: {sorted(_HEAD_FROM_REFERENCE)}."
            )
        head = _HEAD_FROM_REFERENCE[reference_head]
    confidence = bool(flat.get("enable_confidence_head", False))
    rope = flat.get("rope_parameters") or flat.get("rope_scaling") or {"rope_type": "default"}
    rope = {**rope, "rope_theta": rope.get("rope_theta", flat.get("rope_theta", 10000.0))}
    fields = {name: flat[name] for name in _SHARED_FIELDS if name in flat}
    fields.update({k: v for k, v in (flat.get(_EXTRA_KEY) or {}).items() if k != _VOCABULARY_KEY})
    fields.update(
        rope_parameters=rope,
        markov_head_type=head,
        markov_rank=rank if rank > 0 else DSparkDraftConfig.markov_rank,
        confidence_head=confidence,
        confidence_head_with_markov=bool(flat.get("confidence_head_with_markov", rank > 0)),
    )
    config = DSparkDraftConfig(**fields)
    for name in _REFERENCE_ONLY_FIELDS:
        if name in flat:
            setattr(config, name, flat[name])
    return config


def save_deepspec_checkpoint(draft, save_directory: str | os.PathLike) -> None:
    """Writes `config.json` + `model.safetensors` in the reference layout (with embedding and LM-head copies)."""
    embed, lm_head = draft.get_input_embeddings(), draft.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("The reference layout has no LM-head bias; this target's LM head has one.")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v for k, v in draft.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head.", _VOCABULARY_KEY))
    }
    state["embed_tokens.weight"] = embed.weight
    state["lm_head.weight"] = lm_head.weight
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_reference_names(state).items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    flat = reference_config(draft.config, draft.dtype)
    flat[_EXTRA_KEY][_VOCABULARY_KEY] = _draft_vocabulary(draft)
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(flat, f, indent=2, sort_keys=True)


def load_deepspec_checkpoint(
    model_class: type[nn.Module], path: str | os.PathLike, dtype: torch.dtype | str | None = None, **kwargs
):
    """Builds a `model_class` draft (a [`DSparkDraftModel`]) from a reference-layout checkpoint.

    The checkpoint's embedding and LM-head copies are kept as the draft's own modules until a target is attached.
    Tensors keep their stored dtype unless `dtype` is given.
    """
    dtype = kwargs.pop("torch_dtype", None) or dtype
    flat = _read_config(path, **kwargs)
    config = config_from_reference(flat)
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    state = from_reference_names(load_file(cached_file(str(path), WEIGHTS_NAME, **hub_kwargs)))
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key not in state:
            raise ValueError(f"Reference checkpoint at {path} has no {key!r}; it is not a self-contained DSpark draft.")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is None or dtype == "auto":
        dtype = state["fc.weight"].dtype
    model = model_class(config)
    model.embed_tokens = nn.Embedding(*state["embed_tokens.weight"].shape)
    model.lm_head = nn.Linear(state["lm_head.weight"].shape[1], state["lm_head.weight"].shape[0], bias=False)
    model.load_state_dict(state, strict=True)
    model.set_draft_vocabulary((flat.get(_EXTRA_KEY) or {}).get(_VOCABULARY_KEY))
    return model.to(dtype).eval()
