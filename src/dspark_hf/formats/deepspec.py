"""Import and export of the reference (DeepSpec) checkpoint layout that vLLM and SGLang serve.

The reference has two draft families, chosen by `architectures[0]`: `Qwen3DSparkModel` (a flat Qwen3 config) and
`Gemma4DSparkModel` (a flat `gemma4_text` config with `global_head_dim`, `num_global_key_value_heads`,
`attention_k_eq_v`, ...). Both carry the flat DSpark fields (`block_size`, `target_layer_ids`, `mask_token_id`,
`num_anchors`, `markov_rank`, `markov_head_type`, `enable_confidence_head`, `confidence_head_with_markov`) and a
self-contained state dict that also holds copies of the target's `embed_tokens` (unscaled) and `lm_head`. They map
to `DSparkDraftConfig.draft_architecture` "qwen3" and "gemma4". Our module names follow the reference keys but for
the ones in `PARAMETER_RENAMES`, so conversion is a config mapping, those renames and the two copied tensors. A
reference checkpoint this library cannot run the way the reference does raises `ValueError` naming the field.
`tests/fixtures/deepspec/` holds checkpoints written by the reference's own code (its README documents the layout).
"""

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import cached_file

from ..models.dspark.configuration_dspark import DSparkDraftConfig
from ..models.dspark.gemma4_layers import DSparkScaledEmbedding

# The reference's draft classes (its `architectures[0]`) and config model types, per `draft_architecture`.
REFERENCE_ARCHITECTURES = {"qwen3": "Qwen3DSparkModel", "gemma4": "Gemma4DSparkModel"}
REFERENCE_ARCHITECTURE = REFERENCE_ARCHITECTURES["qwen3"]
_MODEL_TYPES = {"qwen3": "qwen3", "gemma4": "gemma4_text"}
WEIGHTS_NAME = "model.safetensors"
# Our head names ↔ the reference's (`vanilla` is the reference name of the first-order Markov head).
_HEAD_TO_REFERENCE = {"markov": "vanilla", "gated": "gated", "rnn": "rnn"}
_HEAD_FROM_REFERENCE = {"vanilla": "markov", "markov": "markov", "gated": "gated", "rnn": "rnn"}
# Our parameter-name prefixes → the reference's, where they differ (the reverse map is applied on import).
PARAMETER_RENAMES = {"markov_head.rnn_proj.": "markov_head.joint_proj."}
# Anchors per training sequence: only the reference's trainer reads it, but its model constructors require it. A draft
# trained here has none of its own, so it is exported with the value of the released recipes.
DEFAULT_NUM_ANCHORS = 512
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
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
# The other entries of an imported Gemma 4 reference config that describe the target rather than the draft (its
# sliding layers' `head_dim`, `sliding_window`, `target_model_type`, ...): kept in this config attribute and written
# back under the reference's values on export.
PASSTHROUGH_ATTRIBUTE = "deepspec_fields"
_NOT_PASSED_THROUGH = (
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "per_layer_config"
)
# The draft vocabulary (`DSparkDraftModel.set_draft_vocabulary`) travels as a token-id list under _EXTRA_KEY, so the
# reference state dict holds only tensors that vLLM and SGLang know.
_VOCABULARY_KEY = "draft_vocab_ids"
# Backbone fields every reference draft config (DSpark and EAGLE-3) shares with ours, same name and meaning.
BACKBONE_FIELDS = (
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
)
_SHARED_FIELDS = BACKBONE_FIELDS + (
    "block_size",
    "mask_token_id",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Gemma 4 reference fields our config holds under other names or computes from (read on import, written on export).
_GEMMA4_FIELDS = (
    "global_head_dim",
    "num_global_key_value_heads",
    "attention_k_eq_v",
    "hidden_activation",
    "use_double_wide_mlp",
    "num_kv_shared_layers",
    "enable_moe_block",
    "hidden_size_per_layer_input",
    "final_logit_softcapping",
    "rope_parameters",
    "layer_types",
)


def read_reference_config(path: str | os.PathLike, **kwargs) -> dict | None:
    """The `config.json` of a local folder or Hub repository as a dict, or None when there is none."""
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    resolved = cached_file(str(path), "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if resolved is None:
        return None
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def foreign_config(path: str | os.PathLike, own_model_type: str, **kwargs) -> dict | None:
    """The `config.json` of `path` as a dict when it is another implementation's (its model type is not
    `own_model_type`), else None (no config, an unreadable path, or one of this library's checkpoints)."""
    try:
        config = read_reference_config(path, **kwargs)
    except OSError:
        return None
    if not config or config.get("model_type") == own_model_type:
        return None
    return config


def is_deepspec_checkpoint(path: str | os.PathLike, **kwargs) -> bool:
    """True when `path` holds a reference-layout checkpoint (any `*DSparkModel` architecture; loading one this library
    cannot read raises a `ValueError` that says why)."""
    config = foreign_config(path, DSparkDraftConfig.model_type, **kwargs)
    return config is not None and any(str(a).endswith("DSparkModel") for a in config.get("architectures") or [])


MISSING = object()


def unsupported_field(field: str, value, expectation: str, family: str = "DSpark") -> ValueError:
    """The `ValueError` for a reference checkpoint of `family` whose `field` (`MISSING`: absent) this library cannot
    read, with what it expects."""
    found = f"no {field}" if value is MISSING else f"{field}={value!r}"
    return ValueError(f"Reference {family} checkpoint has {found}, which this library cannot read: {expectation}.")


def reference_family(flat: dict) -> str:
    """The `draft_architecture` of a reference config, from `architectures[0]` as the reference's `eval.py` picks its
    class; raises `ValueError` for any other class."""
    architectures = flat.get("architectures") or []
    name = architectures[0] if architectures else None
    for family, reference_name in REFERENCE_ARCHITECTURES.items():
        if name == reference_name:
            return family
    raise unsupported_field(
        "architectures[0]", name, f"the reference's draft classes are {sorted(REFERENCE_ARCHITECTURES.values())}"
    )


def reference_config(config: DSparkDraftConfig, dtype: torch.dtype) -> dict:
    """The flat reference config of a draft (its `draft_architecture` picks the reference class)."""
    family = config.draft_architecture
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    kept = dict(getattr(config, PASSTHROUGH_ATTRIBUTE, None) or {}) if family == "gemma4" else {}
    flat = {**kept, **{name: getattr(config, name) for name in _SHARED_FIELDS}}
    flat.update(
        architectures=[REFERENCE_ARCHITECTURES[family]],
        model_type=_MODEL_TYPES[family],
        dtype=str(dtype).removeprefix("torch."),
        tie_word_embeddings=False,
        layer_types=["full_attention"] * config.num_hidden_layers,
        markov_rank=config.markov_rank if config.has_sequential_head else 0,
        enable_confidence_head=bool(config.confidence_head),
        confidence_head_with_markov=bool(
            config.confidence_head and config.has_sequential_head and config.confidence_head_with_markov
        ),
        num_anchors=getattr(config, "num_anchors", DEFAULT_NUM_ANCHORS),
    )
    if family == "gemma4":
        flat.update(gemma4_reference_fields(config, kept, rope))
        del flat["hidden_act"]
    else:
        flat.update(
            use_sliding_window=False,
            sliding_window=None,
            rope_parameters=rope,
            rope_theta=rope.get("rope_theta", 10000.0),
            rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
        )
    if config.has_sequential_head:
        flat["markov_head_type"] = _HEAD_TO_REFERENCE[config.markov_head_type]
    flat[_EXTRA_KEY] = {name: getattr(config, name) for name in _EXTRA_FIELDS}
    return flat


def gemma4_reference_fields(config: DSparkDraftConfig, kept: dict, rope: dict) -> dict:
    """The Gemma 4 fields of the reference config. Our `head_dim` / `num_key_value_heads` are the draft layers' (the
    reference's `global_head_dim` and, with `attention_k_eq_v`, `num_global_key_value_heads`); the reference's
    `head_dim` and the kv-head count of the branch it does not use describe the target and keep an import's values."""
    heads, k_eq_v = config.num_key_value_heads, bool(config.attention_k_eq_v)
    return {
        "head_dim": kept.get("head_dim", config.head_dim),
        "global_head_dim": config.head_dim,
        "num_key_value_heads": kept.get("num_key_value_heads", heads) if k_eq_v else heads,
        "num_global_key_value_heads": heads if k_eq_v else kept.get("num_global_key_value_heads", heads),
        "attention_k_eq_v": k_eq_v,
        "hidden_activation": config.hidden_act,
        "use_double_wide_mlp": bool(config.use_double_wide_mlp),
        "num_kv_shared_layers": config.num_kv_shared_layers,
        "enable_moe_block": False,
        "hidden_size_per_layer_input": 0,
        "final_logit_softcapping": config.final_logit_softcapping,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            **(kept.get("rope_parameters") or {}),
            "full_attention": rope,
        },
    }


def to_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A draft state dict with the reference's parameter names ([`PARAMETER_RENAMES`])."""
    return rename_prefixes(state, PARAMETER_RENAMES)


def from_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of [`to_reference_names`]."""
    return rename_prefixes(state, {theirs: ours for ours, theirs in PARAMETER_RENAMES.items()})


def rename_prefixes(state: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """`state` with each key's first matching prefix of `renames` replaced by its value."""
    renamed = {}
    for key, value in state.items():
        old = next((prefix for prefix in renames if key.startswith(prefix)), None)
        renamed[key if old is None else renames[old] + key[len(old) :]] = value
    return renamed


def _draft_vocabulary(draft) -> list[int] | None:
    return None if draft.draft_vocab_ids is None else draft.draft_vocab_ids.tolist()


def config_from_reference(flat: dict) -> DSparkDraftConfig:
    """Inverse of [`reference_config`]; raises `ValueError` on a layout this library cannot serve."""
    family = reference_family(flat)
    missing = [k for k in ("block_size", "target_layer_ids", "mask_token_id", "hidden_size", "vocab_size") if k not in flat]
    if missing:
        raise ValueError(f"Reference DSpark config is missing required field(s) {missing}.")
    layer_types = flat.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise unsupported_field(
            "layer_types", layer_types, 'every draft layer must be "full_attention" (as build_draft_config writes)'
        )
    if not layer_types and flat.get("use_sliding_window"):  # Qwen3Config would then make sliding layers
        raise unsupported_field("use_sliding_window", True, "draft layers attend to the whole context (no sliding window)")
    rank = int(flat.get("markov_rank", 0) or 0)
    head = "none"
    if rank > 0:
        reference_head = str(flat.get("markov_head_type", "vanilla")).lower()
        if reference_head not in _HEAD_FROM_REFERENCE:
            raise unsupported_field(
                "markov_head_type", reference_head, f"the reference's head types are {sorted(_HEAD_TO_REFERENCE.values())}"
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
    if family == "gemma4":
        fields.update(gemma4_config_fields(flat))
    config = DSparkDraftConfig(**fields)
    for name in _REFERENCE_ONLY_FIELDS:
        if name in flat:
            setattr(config, name, flat[name])
    if family == "gemma4":
        consumed = {*_SHARED_FIELDS, *_REFERENCE_ONLY_FIELDS, _EXTRA_KEY}
        setattr(config, PASSTHROUGH_ATTRIBUTE, gemma4_passthrough(flat, consumed))
    return config


def gemma4_passthrough(flat: dict, consumed) -> dict:
    """The entries of a Gemma 4 reference config that describe the target rather than the draft (all but `consumed`,
    the Gemma 4 draft fields and bookkeeping; the reference's `head_dim` / kv-head counts and its non-full-attention
    RoPE entries included), to be written back on export."""
    consumed = {*consumed, *_GEMMA4_FIELDS, *_NOT_PASSED_THROUGH}
    kept = {k: v for k, v in flat.items() if k not in consumed or k in ("head_dim", "num_key_value_heads")}
    if "num_global_key_value_heads" in flat:
        kept["num_global_key_value_heads"] = flat["num_global_key_value_heads"]
    kept["rope_parameters"] = {k: v for k, v in flat["rope_parameters"].items() if k != "full_attention"}
    return kept


def gemma4_config_fields(flat: dict, reference_class: str = "Gemma4DSparkModel", family: str = "DSpark") -> dict:
    """Our config fields for a reference Gemma 4 draft config (`reference_class`, a draft of `family`); raises
    `ValueError` for what its constructor rejects or what this library cannot run (per-layer inputs, MoE blocks, a
    missing head geometry)."""
    # A missing entry takes Gemma4TextConfig's default there: enable_moe_block=False (fine), hidden_size_per_layer_input=256.
    for field, expected, default in (("enable_moe_block", False, False), ("hidden_size_per_layer_input", 0, 256)):
        value = flat.get(field, MISSING)
        if (default if value is MISSING else value) != expected or value is None:
            raise unsupported_field(
                field, value, f"the reference's {reference_class} asserts {field} == {expected!r} (its draft layers "
                f"have no MoE block and no per-layer inputs; a missing value means {default!r})", family
            )
    flat = _global_fields_from_per_layer_config(flat)
    k_eq_v = bool(flat.get("attention_k_eq_v", False))
    required = ["global_head_dim", "num_global_key_value_heads" if k_eq_v else "num_key_value_heads"]
    for field in required:
        if flat.get(field) is None:
            raise unsupported_field(
                field, flat.get(field, MISSING), f"the reference's {reference_class} needs it for the draft's "
                "attention geometry" + (" with attention_k_eq_v=true" if field == "num_global_key_value_heads" else ""),
                family,
            )
    rope = flat.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("full_attention"), dict):
        raise unsupported_field(
            "rope_parameters", rope, f'the reference\'s {reference_class} reads rope_parameters["full_attention"]', family
        )
    return {
        "draft_architecture": "gemma4",
        "head_dim": flat["global_head_dim"],
        "num_key_value_heads": flat[required[1]],
        "attention_k_eq_v": k_eq_v,
        "attention_scale": 1.0,
        "hidden_act": flat.get("hidden_activation", "gelu_pytorch_tanh"),
        "use_double_wide_mlp": bool(flat.get("use_double_wide_mlp", False)),
        "num_kv_shared_layers": int(flat.get("num_kv_shared_layers") or 0),
        "final_logit_softcapping": flat.get("final_logit_softcapping"),
        "rope_parameters": dict(rope["full_attention"]),
        # The reference scales the embedding by √hidden_size inside its embedding module, as the Gemma 4 target's
        # own module does: the draft applies no scale of its own (see load_deepspec_checkpoint).
        "embedding_scale": 1.0,
    }


def _global_fields_from_per_layer_config(flat: dict) -> dict:
    """`global_head_dim` / `num_global_key_value_heads` of a config re-saved by transformers >= 5.24, which moves them
    into `per_layer_config` (overrides of the full-attention layers, i.e. of every draft layer, written only where
    they differ from `head_dim` / `num_key_value_heads`). Values that differ between layers stay missing."""
    per_layer = flat.get("per_layer_config")
    if not isinstance(per_layer, dict) or "global_head_dim" in flat:
        return flat
    layers = {int(index): overrides for index, overrides in per_layer.items()}
    flat = dict(flat)
    for name, attribute in (("global_head_dim", "head_dim"), ("num_global_key_value_heads", "num_key_value_heads")):
        values = {layers.get(i, {}).get(attribute, flat.get(attribute)) for i in range(flat.get("num_hidden_layers", 0))}
        if len(values) == 1 and name not in flat:
            flat[name] = values.pop()
    return flat


def check_exportable(draft, reference_classes: dict[str, str] = REFERENCE_ARCHITECTURES) -> None:
    """Raises `ValueError` when the reference class (`reference_classes[draft_architecture]`) would compute
    something else than this draft."""
    config = draft.config
    embed, lm_head = draft.get_input_embeddings(), draft.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("The reference layout has no LM-head bias; this target's LM head has one.")
    scale = config.attention_scale
    if config.draft_architecture == "gemma4":
        module_scale = float(getattr(embed, "embed_scale", 1.0))
        expected = config.hidden_size**0.5
        if not math.isclose(module_scale * config.embedding_scale, expected, rel_tol=1e-2):
            raise ValueError(
                f"The reference's {reference_classes['gemma4']} scales embeddings by sqrt(hidden_size)={expected:.4g}; "
                f"this draft scales them by {module_scale * config.embedding_scale:.4g} (embedding module × "
                "embedding_scale)."
            )
        if scale != 1.0:
            raise ValueError(
                f"The reference's {reference_classes['gemma4']} uses attention scale 1.0; this draft has {scale!r}."
            )
    elif scale is not None and not math.isclose(scale, config.head_dim**-0.5):
        raise ValueError(
            f"The reference's {reference_classes['qwen3']} uses attention scale head_dim**-0.5; this draft has "
            f"attention_scale={scale}."
        )


def save_deepspec_checkpoint(draft, save_directory: str | os.PathLike) -> None:
    """Writes `config.json` + `model.safetensors` in the reference layout (with embedding and LM-head copies)."""
    check_exportable(draft)
    embed, lm_head = draft.get_input_embeddings(), draft.get_output_embeddings()
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v for k, v in draft.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head.", _VOCABULARY_KEY))
    }
    state["embed_tokens.weight"] = embed.weight  # unscaled: a scaling embedding module applies its factor itself
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

    The checkpoint's embedding and LM-head copies are kept as the draft's own modules until a target is attached
    (a Gemma 4 draft's embedding multiplies by √hidden_size, as the reference's does). Tensors keep their stored dtype
    unless `dtype` is given.
    """
    dtype = kwargs.pop("torch_dtype", None) or dtype
    flat = read_reference_config(path, **kwargs)
    config = config_from_reference(flat)
    state = from_reference_names(read_reference_weights(path, **kwargs))
    model = build_from_reference_state(model_class, config, state, path, dtype, family="DSpark")
    model.set_draft_vocabulary((flat.get(_EXTRA_KEY) or {}).get(_VOCABULARY_KEY))
    return model


def read_reference_weights(
    path: str | os.PathLike, names: tuple[str, ...] = (WEIGHTS_NAME,), **kwargs
) -> dict[str, torch.Tensor]:
    """The tensors of a reference checkpoint (local folder or Hub repository): the first of the files `names` that
    exists, a safetensors file or a PyTorch state dict (`*.bin`, read with `weights_only=True`)."""
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    for name in names:
        resolved = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if resolved is None:
            continue
        if name.endswith(".safetensors"):
            return load_file(resolved)
        return torch.load(resolved, map_location="cpu", weights_only=True)
    raise OSError(f"No weights file {' or '.join(names)} found at {path}.")


def build_from_reference_state(
    model_class: type[nn.Module],
    config,
    state: dict[str, torch.Tensor],
    path,
    dtype,
    family: str,
    required: tuple[str, ...] = ("embed_tokens.weight", "lm_head.weight"),
) -> nn.Module:
    """A `model_class(config)` holding a reference state dict (our names), in `dtype` (None / "auto": the stored
    one), in eval mode. The state's `embed_tokens` / `lm_head` copies (those of them in `required` must be there)
    become the draft's own modules until a target is attached (a Gemma 4 draft's embedding multiplies by
    √hidden_size, as the reference's does). Raises `ValueError` naming missing or unexpected weights."""
    for key in required:
        if key not in state:
            raise ValueError(
                f"Reference checkpoint at {path} has no {key!r}; it is not a self-contained {family} draft."
            )
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is None or dtype == "auto":
        dtype = state["fc.weight"].dtype if "fc.weight" in state else torch.float32
    model = model_class(config)
    if "embed_tokens.weight" in state:
        vocab, hidden = state["embed_tokens.weight"].shape
        if config.draft_architecture == "gemma4":
            model.embed_tokens = DSparkScaledEmbedding(vocab, hidden, scale=hidden**0.5)
        else:
            model.embed_tokens = nn.Embedding(vocab, hidden)
    if "lm_head.weight" in state:
        model.lm_head = nn.Linear(state["lm_head.weight"].shape[1], state["lm_head.weight"].shape[0], bias=False)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Reference {family} checkpoint at {path} does not match its config.json: weights missing {missing}, "
            f"unexpected {unexpected}."
        )
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()
