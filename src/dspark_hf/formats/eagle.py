"""Import and export of the EAGLE-3 checkpoint layout of EAGLE (SafeAILab), SpecForge and SGLang, which vLLM serves.

The draft is one Llama decoder layer over [embedding ; hidden] with its own LM head over a draft vocabulary:

- `config.json`: a Llama config of the draft (`model_type: "llama"`, `num_hidden_layers: 1`) with `draft_vocab_size`
  (absent: the whole vocabulary) and `architectures` `LlamaForCausalLMEagle3` (SpecForge, SGLang, vLLM),
  `Eagle3LlamaForCausalLM` (vLLM's class) or `LlamaForCausalLM` (EAGLE's training config). RoPE from `rope_theta` /
  `rope_scaling` (or transformers 5's `rope_parameters`); `head_dim` defaults to `hidden_size // num_attention_heads`.
- Target layers: `eagle_config.eagle_aux_hidden_state_layer_ids` (SpecForge, SGLang) are the layers whose *outputs*
  `fc` reads, our `target_layer_ids`; vLLM's top-level `eagle_aux_hidden_state_layer_ids` are the layers whose
  *inputs* it reads (ours + 1). Without either, all of them read the inputs of target layers 2, L//2 and L−3 of an
  L-layer target: `target_layer_ids = [1, L//2 − 1, L − 4]`, derived here from the target's layer count.
- Weights (`model.safetensors`, or EAGLE's `pytorch_model.bin`): `midlayer.*` (vLLM also reads `layers.0.*`), our
  `layers.0.*` of the `"llama"` layer design (no q/k norms); `fc.weight` `(d, 3d)`; `norm.weight`; `lm_head.weight`
  `(draft_vocab_size, d)`, our `draft_lm_head`; `d2t` `(draft_vocab_size,)` int64 (draft row i is target token
  `i + d2t[i]`) and `t2d` `(vocab_size,)` bool (the target tokens in the draft vocabulary), which become our sorted
  `draft_vocab_ids`; an `embed_tokens.weight` copy (some SpecForge exports) is used until a target is attached.

Our config fields with no place there (`ttt_length`, `step_loss_decay`, `num_target_layers`) travel under the config key
`dspark_hf`, and an import keeps the config entries it does not use (`config.eagle_fields`) to write them back.
`tests/fixtures/eagle3_eagle/` holds checkpoints and outputs written by EAGLE's and SpecForge's own code (its README
names the sources). A checkpoint this library cannot run as they do raises `ValueError` naming the field and the fix.
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
    WEIGHTS_NAME,
    build_from_reference_state,
    foreign_config,
    read_reference_config,
    read_reference_weights,
    rename_prefixes,
    unsupported_field,
)

EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle3"
# `architectures[0]` of EAGLE-3 drafts (SpecForge / SGLang, vLLM); EAGLE's own config says `LlamaForCausalLM`.
_EAGLE3_CLASSES = (EAGLE_ARCHITECTURE, "Eagle3LlamaForCausalLM")
WEIGHT_NAMES = (WEIGHTS_NAME, "pytorch_model.bin")
_FAMILY = "EAGLE-3 (EAGLE / SpecForge)"
# Their parameter names → ours (prefixes); the reverse on export.
_FROM_EAGLE = {"midlayer.": "layers.0.", "lm_head.": "draft_lm_head."}
_TO_EAGLE = {ours: theirs for theirs, ours in _FROM_EAGLE.items()}
# Llama config fields the draft config shares with ours, same name and meaning.
_LLAMA_FIELDS = tuple(f for f in BACKBONE_FIELDS if f not in ("num_target_layers", "target_layer_ids")) + (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_EXTRA_KEY = "dspark_hf"
_EXTRA_FIELDS = ("num_target_layers", "ttt_length", "step_loss_decay")
_LAYERS_KEY = "eagle_aux_hidden_state_layer_ids"
PASSTHROUGH_ATTRIBUTE = "eagle_fields"
# Rewritten on export, or bookkeeping: not passed through.
_BOOKKEEPING = (
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "draft_vocab_size",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    _LAYERS_KEY,
    _EXTRA_KEY,
)
# Options of their layers this library does not run: (config key, the value it runs, what the other value does).
_LAYER_OPTIONS = (
    ("norm_before_residual", False, "vLLM's option adds hidden_norm(h) instead of h to the attention output"),
    ("fc_norm", False, "SpecForge's option normalises each target layer's features before fc"),
    ("norm_output", True, "SpecForge's option computes logits without the final norm"),
    ("mlp_bias", False, "vLLM's option adds biases to the MLP projections"),
)


def is_eagle_checkpoint(path: str | os.PathLike, **kwargs) -> bool:
    """True when `path` holds an EAGLE / SpecForge EAGLE-3 checkpoint: `architectures[0]` `LlamaForCausalLMEagle3` or
    `Eagle3LlamaForCausalLM`, or a Llama config with `draft_vocab_size` (loading one this library cannot read raises a
    `ValueError` that says why)."""
    config = foreign_config(path, Eagle3DraftConfig.model_type, **kwargs)
    if config is None:
        return False
    name = str((config.get("architectures") or [""])[0])
    return name in _EAGLE3_CLASSES or (config.get("model_type") == "llama" and "draft_vocab_size" in config)


def eagle_target_layer_ids(
    flat: dict, target_layer_ids: list[int] | None = None, num_target_layers: int | None = None
) -> list[int]:
    """The target layers (our `target_layer_ids`) of an EAGLE-3 config: `target_layer_ids` if given, else the ones
    the config names (SpecForge / SGLang or vLLM key), else the default of a `num_target_layers`-layer target
    `[1, L//2 − 1, L − 4]`. Raises `ValueError` when none of these is known."""
    if target_layer_ids is not None:
        return [int(i) for i in target_layer_ids]
    named = (flat.get("eagle_config") or {}).get(_LAYERS_KEY)
    vllm = flat.get(_LAYERS_KEY)
    if vllm is not None:
        if 0 in vllm:
            raise unsupported_field(
                _LAYERS_KEY, vllm, "vLLM's id 0 reads the token embedding, which this library's drafts do not", _FAMILY
            )
        if named is not None and [int(i) for i in named] != [int(i) - 1 for i in vllm]:
            raise ValueError(
                f"EAGLE-3 config names two different sets of target layers: eagle_config.{_LAYERS_KEY}={named} (layers "
                f"whose outputs are read) and {_LAYERS_KEY}={vllm} (vLLM: layers whose inputs are read, one more). "
                "Remove the wrong entry, or pass target_layer_ids=[...]."
            )
        named = [int(i) - 1 for i in vllm]
    if named is not None:
        return [int(i) for i in named]
    if num_target_layers is None:
        raise ValueError(
            f"The EAGLE-3 config does not say which target layers the draft reads (no eagle_config.{_LAYERS_KEY}). "
            "Pass target_model=... (the default layers of EAGLE, SpecForge, SGLang and vLLM follow from its layer "
            "count) or target_layer_ids=[...]."
        )
    return [1, num_target_layers // 2 - 1, num_target_layers - 4]


def config_from_eagle(
    flat: dict, target_layer_ids: list[int] | None = None, num_target_layers: int | None = None
) -> Eagle3DraftConfig:
    """Our config (Llama layer design, own LM head) for an EAGLE-3 config; raises `ValueError` naming a field this
    library cannot run as EAGLE / SpecForge / vLLM do."""
    if flat.get("model_type", "llama") != "llama":
        raise unsupported_field(
            "model_type", flat["model_type"], 'this layout is the Llama-layer draft (model_type "llama")', _FAMILY
        )
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
        if flat.get(field) is None:
            raise unsupported_field(field, flat.get(field, MISSING), "every EAGLE-3 draft config has it", _FAMILY)
    hidden, layers = flat["hidden_size"], flat.get("num_hidden_layers", 1)
    if layers != 1:
        raise unsupported_field(
            "num_hidden_layers", layers, "one draft layer (midlayer): vLLM's deeper EAGLE-3 drafts feed the token "
            "embedding to their first layer only, while every layer of this library's reads it", _FAMILY,
        )
    if flat.get("target_hidden_size", hidden) != hidden:
        raise unsupported_field(
            "target_hidden_size", flat["target_hidden_size"], f"the draft borrows the target's embedding, so the "
            f"target must be as wide as the draft (hidden_size={hidden})", _FAMILY,
        )
    for name, value, effect in _LAYER_OPTIONS:
        if name in flat and bool(flat[name]) != value:
            raise unsupported_field(name, flat[name], f"this library runs {name}={value} only ({effect})", _FAMILY)
    if (flat.get("eagle_config") or {}).get("use_aux_hidden_state", True) is False:
        raise unsupported_field(
            "eagle_config.use_aux_hidden_state", False, "an EAGLE-3 draft fuses target layers with fc", _FAMILY
        )
    rope = dict(flat.get("rope_parameters") or flat.get("rope_scaling") or {})
    rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
    if rope_type == "mrope":
        raise unsupported_field("rope_type", rope_type, "1-D positions (no multimodal RoPE)", _FAMILY)
    rope.update(rope_type=rope_type, rope_theta=rope.get("rope_theta", flat.get("rope_theta", 10000.0)))
    extra = flat.get(_EXTRA_KEY) or {}
    num_target_layers = num_target_layers or extra.get("num_target_layers")
    fields = {name: flat[name] for name in _LLAMA_FIELDS if flat.get(name) is not None}
    fields.update({name: extra[name] for name in _EXTRA_FIELDS if extra.get(name) is not None})
    draft_vocab_size = flat.get("draft_vocab_size") or flat["vocab_size"]
    fields.update(
        num_hidden_layers=1,
        head_dim=flat.get("head_dim") or hidden // flat["num_attention_heads"],
        draft_architecture="llama",
        rope_parameters=rope,
        num_target_layers=num_target_layers,
        target_layer_ids=eagle_target_layer_ids(flat, target_layer_ids, num_target_layers),
        use_draft_lm_head=True,
        draft_vocab_size=draft_vocab_size if draft_vocab_size < flat["vocab_size"] else None,
    )
    try:
        config = Eagle3DraftConfig(**fields)
    except ValueError as error:
        raise ValueError(f"{_FAMILY} checkpoint has a config this library cannot read: {error}") from error
    consumed = {*_LLAMA_FIELDS, *_BOOKKEEPING, "eagle_config"}
    kept = {k: v for k, v in flat.items() if k not in consumed}
    eagle_options = {k: v for k, v in (flat.get("eagle_config") or {}).items() if k != _LAYERS_KEY}
    if eagle_options:  # written back beside the target layers
        kept["eagle_config"] = eagle_options
    setattr(config, PASSTHROUGH_ATTRIBUTE, kept)
    return config


def draft_vocabulary_from_eagle(
    d2t: torch.Tensor | None, t2d: torch.Tensor | None, rows: int, vocab_size: int
) -> torch.LongTensor | None:
    """The sorted target ids `(rows,)` of an EAGLE-3 head with `rows` rows, from its `d2t` (and `t2d`, checked against
    it); None for a head over the whole vocabulary. Raises `ValueError` naming an inconsistency and the fix."""
    if rows == vocab_size:
        if (d2t is not None and d2t.any()) or (t2d is not None and not t2d.all()):
            raise ValueError(
                f"The draft's LM head covers the whole vocabulary ({vocab_size} rows), but d2t / t2d describe a "
                "smaller draft vocabulary. Set draft_vocab_size in config.json to the head's size, or re-export the "
                "checkpoint with d2t = 0 and t2d = True everywhere."
            )
        return None
    if d2t is None:
        raise ValueError(
            f"The draft's LM head has {rows} of {vocab_size} rows but the checkpoint has no d2t buffer saying which "
            "target token each row is. Re-export it with its vocabulary mapping (d2t and t2d; SpecForge: "
            "--vocab-mapping)."
        )
    if tuple(d2t.shape) != (rows,) or d2t.is_floating_point() or d2t.dtype == torch.bool:
        raise ValueError(f"d2t must be an integer tensor of shape ({rows},) (one per LM-head row), got {d2t.dtype} "
                         f"{tuple(d2t.shape)}.")
    ids = torch.arange(rows) + d2t.long()
    outside = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if outside.numel():
        index = int(outside[0])
        raise ValueError(
            f"d2t maps draft index {index} to target token {int(ids[index])}, outside the target vocabulary "
            f"[0, {vocab_size}). Check that the checkpoint belongs to this target (vocab_size={vocab_size})."
        )
    unordered = (ids[1:] <= ids[:-1]).nonzero()
    if unordered.numel():
        index = int(unordered[0]) + 1
        raise ValueError(
            f"d2t maps draft index {index} to target token {int(ids[index])}, not after index {index - 1}'s "
            f"{int(ids[index - 1])}: EAGLE and SpecForge list the draft vocabulary in increasing target-id order. "
            "Rebuild d2t from the sorted token ids (d2t[i] = ids[i] - i)."
        )
    if t2d is not None:
        expected = torch.zeros(vocab_size, dtype=torch.bool).index_fill_(0, ids, True)
        if tuple(t2d.shape) != (vocab_size,) or not torch.equal(t2d.bool(), expected):
            raise ValueError(
                f"t2d ({tuple(t2d.shape)}, {int(t2d.bool().sum())} tokens marked) disagrees with d2t ({rows} target "
                f"tokens of {vocab_size}). Rebuild t2d from d2t: t2d[i + d2t[i]] = True, False elsewhere."
            )
    return ids


def load_eagle_checkpoint(
    model_class: type[nn.Module],
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    target_layer_ids: list[int] | None = None,
    num_target_layers: int | None = None,
    **kwargs,
):
    """Builds a `model_class` draft (an [`Eagle3DraftModel`]) from an EAGLE / SpecForge EAGLE-3 checkpoint.

    `target_layer_ids` overrides the layers the config names; `num_target_layers` (the target's layer count, which
    `from_pretrained(target_model=...)` passes) gives the default ones when the config names none. Tensors keep their
    stored dtype unless `dtype` is given. Raises `ValueError` naming what does not fit and how to fix it.
    """
    dtype = kwargs.pop("torch_dtype", None) or dtype
    flat = read_reference_config(path, **kwargs)
    config = config_from_eagle(flat, target_layer_ids, num_target_layers)
    state = rename_prefixes(read_reference_weights(path, WEIGHT_NAMES, **kwargs), _FROM_EAGLE)
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    head, fc = state.get("draft_lm_head.weight"), state.get("fc.weight")
    rows = config.draft_vocab_size or config.vocab_size
    if head is not None and head.shape[0] != rows:
        raise ValueError(
            f"lm_head.weight has {head.shape[0]} rows but config.json says draft_vocab_size={rows}. Set "
            f"draft_vocab_size to {head.shape[0]} (the head's size)."
        )
    if fc is not None and fc.shape[1] != config.fused_feature_size:
        ids, d = config.target_layer_ids, config.hidden_size
        raise ValueError(
            f"fc.weight reads {fc.shape[1]} features = {fc.shape[1] / d:g} target layers of hidden_size {d}, but "
            f"target_layer_ids={ids} give {len(ids)}. Pass target_layer_ids with {fc.shape[1] / d:g} layer ids."
        )
    vocab_ids = draft_vocabulary_from_eagle(d2t, t2d, rows, config.vocab_size)
    if vocab_ids is not None:
        state["draft_vocab_ids"] = vocab_ids
    return build_from_reference_state(model_class, config, state, path, dtype, _FAMILY, required=())


def eagle_config(config: Eagle3DraftConfig, dtype: torch.dtype) -> dict:
    """The EAGLE-3 config of a draft: the imported entries kept in `config.eagle_fields`, the Llama fields, the draft
    vocabulary size, RoPE as `rope_theta` / `rope_scaling`, and the target layers under both keys (SpecForge /
    SGLang: outputs read; vLLM: inputs read)."""
    kept = dict(getattr(config, PASSTHROUGH_ATTRIBUTE, None) or {})
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    flat = {"architectures": [EAGLE_ARCHITECTURE], **kept, **{name: getattr(config, name) for name in _LLAMA_FIELDS}}
    flat.update(
        model_type="llama",
        torch_dtype=str(dtype).removeprefix("torch."),
        draft_vocab_size=config.draft_vocab_size or config.vocab_size,
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=None if scaling.get("rope_type", "default") == "default" else scaling,
        tie_word_embeddings=False,
        eagle_config={**(kept.get("eagle_config") or {}), _LAYERS_KEY: list(config.target_layer_ids)},
    )
    flat[_LAYERS_KEY] = [i + 1 for i in config.target_layer_ids]
    flat[_EXTRA_KEY] = {name: getattr(config, name) for name in _EXTRA_FIELDS}
    return flat


def check_eagle_exportable(draft) -> None:
    """Raises `ValueError` when EAGLE / SpecForge / vLLM would compute something else than `draft`."""
    config = draft.config
    lm_head = None if draft.draft_lm_head is not None else draft.get_output_embeddings()
    embed = draft.get_input_embeddings() if draft.is_attached else None
    scale = config.attention_scale
    problems = [
        (config.draft_architecture != "llama", f"their layer is Llama's (no q_norm / k_norm); this draft has the "
         f"{config.draft_architecture!r} design. Build it with draft_architecture='llama'"),
        (config.num_hidden_layers != 1, f"their draft has one layer; this one has {config.num_hidden_layers}"),
        (config.final_logit_softcapping is not None, "they do not soft-cap logits; this draft has "
         f"final_logit_softcapping={config.final_logit_softcapping}"),
        (config.embedding_scale != 1.0 or hasattr(embed, "embed_scale"), "they do not scale token embeddings; this "
         "draft does (embedding_scale or a scaling embedding module)"),
        (scale is not None and abs(scale - config.head_dim**-0.5) > 1e-6 * scale, "they scale attention by "
         f"head_dim**-0.5; this draft has attention_scale={scale}"),
        (getattr(lm_head, "bias", None) is not None, "their LM head has no bias; this target's has one"),
    ]
    for problem, message in problems:
        if problem:
            raise ValueError(f"This draft cannot be saved in the EAGLE-3 layout: {message}.")


def save_eagle_checkpoint(draft, save_directory: str | os.PathLike) -> None:
    """Writes `config.json` + `model.safetensors` in the EAGLE-3 layout (`midlayer.*`, `fc`, `norm`, `lm_head`,
    `d2t`, `t2d`; no embedding). A draft without its own LM head is written with the target's LM-head rows of its
    draft vocabulary as `lm_head`, which gives the same logits. Raises `ValueError` (see [`check_eagle_exportable`])."""
    check_eagle_exportable(draft)
    if draft.draft_lm_head is not None:
        head = draft.draft_lm_head.weight
    else:
        head = draft.get_output_embeddings().weight
        head = head if draft.draft_vocab_ids is None else draft.draft_vocabulary_rows(head)
    state = {k: v for k, v in draft.own_state_dict().items() if k not in ("draft_vocab_ids", "draft_lm_head.weight")}
    state.update({"lm_head.weight": head.to(draft.dtype), "d2t": draft.d2t, "t2d": draft.t2d})
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in rename_prefixes(state, _TO_EAGLE).items()}
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(eagle_config(draft.config, draft.dtype), f, indent=2, sort_keys=True)


__all__ = [
    "EAGLE_ARCHITECTURE",
    "check_eagle_exportable",
    "config_from_eagle",
    "draft_vocabulary_from_eagle",
    "eagle_config",
    "eagle_target_layer_ids",
    "is_eagle_checkpoint",
    "load_eagle_checkpoint",
    "save_eagle_checkpoint",
]
