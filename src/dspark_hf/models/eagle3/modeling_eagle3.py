"""EAGLE-3 draft model: `fc` over fused target features, decoder layer(s) over `[embedding ; hidden]`, a KV cache with
rollback for decoding, and the training-time-test (TTT) forward.

The building blocks (RMSNorms, RoPE, attention, MLP) are the DSpark draft's (`models/dspark/layers.py`,
`gemma4_layers.py`); `config.draft_architecture` picks the Qwen3-style, the Llama (Qwen3-style without q/k norms) or
the Gemma 4 layer design. Position convention (as in the reference): the draft input at position i is (feature of
position i, token i+1), rotated at position i; its output predicts token i+2.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..dspark.gemma4_layers import DSparkGemma4Attention, DSparkGemma4RMSNorm
from ..dspark.layers import DSparkAttention, DSparkMLP, DSparkRMSNorm, DSparkRotaryEmbedding
from ..shared import DraftKVCache, TargetBoundDraftMixin
from .configuration_eagle3 import Eagle3DraftConfig


class Eagle3LlamaAttention(DSparkAttention):
    """The Qwen3-style attention without RMSNorm on queries and keys (Llama's; `draft_architecture="llama"`)."""

    def __init__(self, config: Eagle3DraftConfig, layer_idx: int, input_size: int | None = None):
        super().__init__(config, layer_idx, input_size)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()


_NORM_CLASSES = {"qwen3": DSparkRMSNorm, "llama": DSparkRMSNorm, "gemma4": DSparkGemma4RMSNorm}
_ATTENTION_CLASSES = {"qwen3": DSparkAttention, "llama": Eagle3LlamaAttention, "gemma4": DSparkGemma4Attention}


class Eagle3Cache(DraftKVCache):
    """Keys and values of every draft layer over the positions run so far (after `k_norm` and RoPE), tensors
    `(batch, num_key_value_heads, length, head_dim)`. `crop(length)` drops drafted positions after verification."""


class Eagle3DecoderLayer(nn.Module):
    """One EAGLE-3 layer. With a = [input_layernorm(e) ; hidden_norm(h)] (2d wide, embedding first):

    - `"qwen3"` and `"llama"` (no q/k norms): h = h + attn(a); out = h + mlp(post_attention_layernorm(h));
    - `"gemma4"`: h = h + post_attention_layernorm(attn(a));
      out = (h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))) · layer_scalar.
    """

    def __init__(self, config: Eagle3DraftConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        norm_class = _NORM_CLASSES[config.draft_architecture]
        self.layer_idx = layer_idx
        self.gemma4 = config.draft_architecture == "gemma4"
        self.self_attn = _ATTENTION_CLASSES[config.draft_architecture](config, layer_idx, input_size=2 * d)
        self.mlp = DSparkMLP(config, config.mlp_intermediate_size(layer_idx))
        self.input_layernorm = norm_class(d, eps=eps)
        self.hidden_norm = norm_class(d, eps=eps)
        self.post_attention_layernorm = norm_class(d, eps=eps)
        if self.gemma4:
            self.pre_feedforward_layernorm = norm_class(d, eps=eps)
            self.post_feedforward_layernorm = norm_class(d, eps=eps)
            # Persistent (the reference's checkpoints store it, always 1.0); no optimizer should move it.
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(
        self,
        embeddings: torch.Tensor,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: DraftKVCache,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embeddings and hidden states `(batch, q, d)`, RoPE tables `(batch, q, head_dim)`; appends this layer's
        q new keys/values to `cache` and attends over all of them with the boolean `attention_mask`
        `(batch, 1, q, cached + q)` (None: everything) → `(batch, q, d)`."""
        attn = self.self_attn
        states = torch.cat([self.input_layernorm(embeddings), self.hidden_norm(hidden_states)], dim=-1)
        queries = attn.queries(states, rope)
        cache.update(self.layer_idx, *attn.keys_values(states, rope))
        attention = attn.attend(queries, *cache.layer(self.layer_idx), attention_mask)
        if not self.gemma4:
            hidden_states = hidden_states + attention
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attention)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return (hidden_states + self.post_feedforward_layernorm(mlp)) * self.layer_scalar


@dataclass
class Eagle3DraftOutput(ModelOutput):
    """Output of a draft forward (context step or draft step).

    Args:
        logits: `(batch, q, V)` logits `compute_logits(hidden_states)` (`V = draft_vocab_size` with
            `draft_vocabulary=True` and a draft vocabulary), or None with `compute_logits=False`.
        hidden_states: `(batch, q, d)` pre-norm outputs of the last layer: the next step's hidden input.
        cache: the [`Eagle3Cache`] holding the new keys/values.
    """

    logits: torch.FloatTensor | None = None
    hidden_states: torch.FloatTensor | None = None
    cache: Eagle3Cache | None = None


@dataclass
class Eagle3TTTOutput(ModelOutput):
    """Output of [`Eagle3DraftModel.ttt_forward`].

    Args:
        logits: `ttt_length` tensors `(batch, seq, V)`: step k at index q predicts token q+k+2.
        hidden_states: `ttt_length` tensors `(batch, seq, d)`: pre-norm outputs h^(k).
    """

    logits: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class Eagle3PreTrainedModel(PreTrainedModel):
    config_class = Eagle3DraftConfig
    base_model_prefix = "eagle3"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Eagle3DecoderLayer"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"^embed_tokens\.", r"^lm_head\."]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Eagle3DecoderLayer) and module.gemma4:
            init.ones_(module.layer_scalar)


def ttt_attention_mask(
    step: int, seq_len: int, valid: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean mask `(batch or 1, 1, seq, (step+1)·seq)` of TTT step `step` over keys [step 0 | step 1 | … | step].

    Index q attends causally to the step-0 keys of valid positions (`valid`: `(batch, seq)`, True for real tokens;
    None = all) and to its own index in steps 1..step. Every row also sees its own current key, so rows past a
    sequence's end stay finite (their outputs are never supervised).
    """
    index = torch.arange(seq_len, device=device)
    causal = index[None, :] <= index[:, None]
    own = torch.eye(seq_len, dtype=torch.bool, device=device)
    first = causal[None] if valid is None else causal[None] & valid[:, None, :].bool()
    blocks = [first | own] + [own.expand_as(first)] * step
    return torch.cat(blocks, dim=-1).unsqueeze(1)


class Eagle3DraftModel(TargetBoundDraftMixin, Eagle3PreTrainedModel):
    """An EAGLE-3 draft for a frozen causal-LM target.

    Like [`DSparkDraftModel`], it borrows the target's input embedding and LM head (bound by [`attach`], never
    stored in its own checkpoint); with `config.use_draft_lm_head` its logits come from its own head `draft_lm_head`
    instead (EAGLE / SpecForge checkpoints). Decoding: [`context_step`] over the verified positions (target features),
    then [`draft_step`] γ times from the last output; `cache.crop(length)` rolls back. Training: [`ttt_forward`] and
    `dspark_hf.training.eagle3_losses.eagle3_loss`.
    """

    def __init__(self, config: Eagle3DraftConfig):
        super().__init__(config)
        norm_class = _NORM_CLASSES[config.draft_architecture]
        self.fc = nn.Linear(config.fused_feature_size, config.hidden_size, bias=False)
        self.layers = nn.ModuleList(Eagle3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.draft_lm_head = None
        if config.use_draft_lm_head:
            rows = config.draft_vocab_size or config.vocab_size
            self.draft_lm_head = nn.Linear(config.hidden_size, rows, bias=False)
        self.rotary_emb = DSparkRotaryEmbedding(config)
        self._init_target_binding()
        self.post_init()

    @classmethod
    def from_target(cls, target: PreTrainedModel, **overrides) -> "Eagle3DraftModel":
        """Builds a fresh, randomly initialised draft for `target` (any transformers causal LM) and attaches it.

        Width, vocabulary, attention geometry (of the target's full-attention layers), RoPE, embedding scale and
        soft-capping come from the target (a Gemma 4 target gets the Gemma 4 layer); `overrides` set any
        [`Eagle3DraftConfig`] field (e.g. `num_hidden_layers=1, ttt_length=7, target_layer_ids=[1, 5, 9]`).
        """
        from ...targets import target_draft_fields

        unknown = set(overrides) - set(Eagle3DraftConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown Eagle3DraftConfig field(s) {sorted(unknown)} passed to from_target.")
        fields = {**target_draft_fields(target, overrides.get("draft_architecture")), **overrides}
        draft = cls(Eagle3DraftConfig(**fields)).to(dtype=target.dtype, device=target.device)
        return draft.attach(target)

    # -- computation -----------------------------------------------------------------------------------------------

    def compute_logits(self, hidden_states: torch.Tensor, draft_vocabulary: bool = False) -> torch.Tensor:
        """Pre-norm outputs `(..., d)` → logits `(..., V)`: LM head of the final norm, soft-capped for Gemma 4.
        With `draft_vocabulary=True` and a draft vocabulary set: `(..., draft_vocab_size)`.

        The LM head is the target's (its draft-vocabulary rows), or the draft's own `draft_lm_head` with
        `config.use_draft_lm_head`, whose full-vocabulary logits are −inf outside the draft vocabulary (decoding
        draws from exactly these, so verification keeps it lossless). [`lm_head_logits`] stays the target's head."""
        states = self.norm(hidden_states)
        if self.draft_lm_head is None:
            return self.lm_head_logits(states, draft_vocabulary)
        logits = self.soft_cap(self.draft_lm_head(states.to(self.draft_lm_head.weight.dtype)))
        return logits if draft_vocabulary else self.scatter_to_vocabulary(logits)

    def set_draft_vocabulary(self, token_ids: Sequence[int] | torch.Tensor | None) -> "Eagle3DraftModel":
        """Restricts drafting to `token_ids`, or drafts over the whole vocabulary again with `None` (see
        [`TargetBoundDraftMixin.set_draft_vocabulary`]).

        With an own LM head (`config.use_draft_lm_head`), its rows are the vocabulary's tokens in increasing id order:
        the vocabulary must have as many tokens as the head has rows (None: `vocab_size`), and the rows keep their
        weights, so choose it before training."""
        if self.draft_lm_head is not None:
            rows = self.draft_lm_head.out_features
            count = self.config.vocab_size
            if token_ids is not None:
                count = torch.as_tensor(token_ids).flatten().unique().numel()
            if count != rows:
                raise ValueError(
                    f"This draft's own LM head has {rows} rows, one per draft-vocabulary token, so it cannot draft "
                    f"over {count} tokens. Pass {rows} token ids, or build a draft with draft_vocab_size={count}."
                )
        return super().set_draft_vocabulary(token_ids)

    def project_features(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """Concatenated target features `(batch, c, len(target_layer_ids)·d)` → `fc` output `(batch, c, d)`."""
        return self.fc(target_hidden_states.to(self.fc.weight.dtype))

    def run_layers(
        self,
        input_ids: torch.LongTensor,
        hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        cache: DraftKVCache,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder layers over q new positions: ids `(batch, q)`, hidden `(batch, q, d)` (already `fc`-projected
        or the draft's own), RoPE positions `(batch, q)`, boolean mask `(batch, 1, q, cached + q)` → `(batch, q, d)`
        pre-norm. Every layer reads the same embeddings; layer l's hidden input is layer l−1's output."""
        embeddings = self.embed(input_ids)
        rope = self.rotary_emb(position_ids, embeddings.dtype)
        for layer in self.layers:
            hidden_states = layer(embeddings, hidden_states, rope, cache, attention_mask)
        return hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        target_hidden_states: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        cache: Eagle3Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        compute_logits: bool = True,
        draft_vocabulary: bool = False,
        ttt_length: int | None = None,
    ) -> "Eagle3DraftOutput | Eagle3TTTOutput":
        """Runs the draft over q new positions, appending their keys/values to `cache` (a new one if None).

        With `ttt_length`, this is instead the training forward: [`ttt_forward`] over whole sequences
        (`input_ids`, `target_hidden_states`, the 2-D `attention_mask` `(batch, seq)` and optional `position_ids`),
        so that trainers call it through their model wrappers (DDP, PEFT, mixed precision) like any forward.

        Args:
            input_ids: `(batch, q)` tokens: position i gets token i+1.
            position_ids: `(batch, q)` RoPE positions.
            target_hidden_states: `(batch, q, len(target_layer_ids)·d)` target features of those positions
                (projected by `fc`); or
            hidden_states: `(batch, q, d)` the draft's own previous outputs (no `fc`). Exactly one must be given.
            cache: earlier positions' keys/values; cropped with `cache.crop(length)` to roll back.
            attention_mask: boolean `(batch, 1, q, cached + q)`, True = may attend. None: every cached position
                plus causal attention among the q new ones.
            compute_logits: also return `compute_logits(hidden_states)`.
            draft_vocabulary: logits over the draft vocabulary only (when one is set).
            ttt_length: run the training-time-test forward with this many steps (see above).
        """
        if ttt_length is not None:
            return self.ttt_forward(
                input_ids, target_hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                ttt_length=ttt_length, draft_vocabulary=draft_vocabulary,
            )
        if position_ids is None:
            raise ValueError("position_ids are required for a decoding forward (only the TTT forward has defaults).")
        if (target_hidden_states is None) == (hidden_states is None):
            raise ValueError("Pass exactly one of target_hidden_states (target features) and hidden_states (draft's).")
        if target_hidden_states is not None:
            hidden_states = self.project_features(target_hidden_states)
        else:
            hidden_states = hidden_states.to(self.fc.weight.dtype)
        cache = Eagle3Cache(self.config.num_hidden_layers) if cache is None else cache
        q_len = input_ids.shape[1]
        if attention_mask is None and q_len > 1:
            past = cache.get_seq_length()
            index = torch.arange(q_len, device=input_ids.device)
            causal = index[None, :] <= index[:, None]
            attention_mask = torch.cat([causal.new_ones(q_len, past), causal], dim=-1)[None, None]
        elif attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.bool()
        hidden_states = self.run_layers(input_ids, hidden_states, position_ids, cache, attention_mask)
        logits = self.compute_logits(hidden_states, draft_vocabulary) if compute_logits else None
        return Eagle3DraftOutput(logits=logits, hidden_states=hidden_states, cache=cache)

    def context_step(
        self,
        target_hidden_states: torch.Tensor,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache: Eagle3Cache | None = None,
        compute_logits: bool = True,
        draft_vocabulary: bool = False,
    ) -> Eagle3DraftOutput:
        """Extends the draft over verified positions [start, end): features `(batch, c, m·d)` of those positions,
        the tokens after them `(batch, c)` and their positions `(batch, c)`; causal among them, attending to all
        cached ones. The last output row `(batch, 1, d)` starts the next [`draft_step`] chain."""
        return self(
            input_ids,
            position_ids,
            target_hidden_states=target_hidden_states,
            cache=cache,
            compute_logits=compute_logits,
            draft_vocabulary=draft_vocabulary,
        )

    def draft_step(
        self,
        input_ids: torch.LongTensor,
        hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        cache: Eagle3Cache,
        compute_logits: bool = True,
        draft_vocabulary: bool = False,
    ) -> Eagle3DraftOutput:
        """One autoregressive step: the just-drafted token `(batch, 1)`, the previous output `(batch, 1, d)` and its
        position `(batch, 1)` (one after the previous step's); extends `cache` by one and returns the next token's
        logits `(batch, 1, V)` and output `(batch, 1, d)`."""
        return self(
            input_ids,
            position_ids,
            hidden_states=hidden_states,
            cache=cache,
            compute_logits=compute_logits,
            draft_vocabulary=draft_vocabulary,
        )

    def ttt_forward(
        self,
        input_ids: torch.LongTensor,
        target_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        ttt_length: int | None = None,
        draft_vocabulary: bool = True,
    ) -> Eagle3TTTOutput:
        """Training-time test over whole sequences, `ttt_length` (default the config's) steps.

        Step 0 runs on `fc(target_hidden_states)`, step k ≥ 1 on step k−1's pre-norm output; step k at index q reads
        token q+k+1 (teacher forcing; 0 past the end), RoPE position `position_ids[q] + k`, and attends causally to
        the step-0 keys plus index q's keys of steps 1..k (one shared KV cache, [step 0 | step 1 | …]). Step k at q
        equals k draft steps from a context ending at q.

        Args:
            input_ids: `(batch, seq)` tokens, right-padded.
            target_hidden_states: `(batch, seq, len(target_layer_ids)·d)` target features of every position.
            attention_mask: `(batch, seq)` 1 for real tokens (None: all); padded keys are not attended.
            position_ids: `(batch, seq)` (default 0..seq−1).
            draft_vocabulary: logits over the draft vocabulary only (when one is set).
        """
        steps = ttt_length or self.config.ttt_length
        batch, seq_len = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        valid = None if attention_mask is None else attention_mask.bool()
        cache = Eagle3Cache(self.config.num_hidden_layers)
        hidden_states = self.project_features(target_hidden_states)
        all_logits, all_hidden = [], []
        for k in range(steps):
            shift = min(k + 1, seq_len)
            tokens = torch.cat([input_ids[:, shift:], input_ids.new_zeros(batch, shift)], dim=1)
            mask = ttt_attention_mask(k, seq_len, valid, device=input_ids.device)
            hidden_states = self.run_layers(tokens, hidden_states, position_ids + k, cache, mask)
            all_hidden.append(hidden_states)
            all_logits.append(self.compute_logits(hidden_states, draft_vocabulary))
        return Eagle3TTTOutput(logits=tuple(all_logits), hidden_states=tuple(all_hidden))

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *args, layout: str = "hf", **kwargs) -> None:
        """Saves the draft (safetensors). `layout="hf"` (default): a transformers checkpoint without the target's
        embedding and LM head; `layout="deepspec"`: the reference's self-contained EAGLE-3 layout (config copy of the
        target, `embed_tokens` and `lm_head` included; see `dspark_hf.formats.deepspec_eagle3`); `layout="eagle"`:
        the layout of EAGLE, SpecForge, SGLang and vLLM (`midlayer.*`, an LM head over the draft vocabulary, `d2t`,
        `t2d`; see `dspark_hf.formats.eagle`)."""
        if layout not in ("hf", "deepspec", "eagle"):
            raise ValueError(f'layout must be "hf", "deepspec" or "eagle", got {layout!r}.')
        if layout == "deepspec":
            from ...formats.deepspec_eagle3 import save_eagle3_deepspec_checkpoint

            save_eagle3_deepspec_checkpoint(self, save_directory)
            return
        if layout == "eagle":
            from ...formats.eagle import save_eagle_checkpoint

            save_eagle_checkpoint(self, save_directory)
            return
        if "embed_tokens" in self._modules and "state_dict" not in kwargs:
            kwargs["state_dict"] = self.own_state_dict()
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, target_model=None, allow_missing_weights: bool = False, **kwargs
    ):
        """Loads a draft saved in any of its layouts, detected from the folder's config: a reference (DeepSpec) folder
        has architectures `Qwen3Eagle3Model`, `Gemma4Eagle3Model` or `Eagle3DraftModel` with a non-`eagle3` model
        type; an EAGLE / SpecForge / vLLM one `LlamaForCausalLMEagle3` / `Eagle3LlamaForCausalLM`, or a Llama config
        with `draft_vocab_size` (its target layers are read from the config, else derived from `target_model`'s layer
        count, else pass `target_layer_ids=`; see `dspark_hf.formats.eagle`). Attaches `target_model` if given
        (moving the draft to its device unless `device_map` is passed). Missing weights are refused by name unless
        `allow_missing_weights=True`; `output_loading_info=True` returns `(model, info)`."""
        from ...formats.deepspec_eagle3 import is_eagle3_deepspec_checkpoint, load_eagle3_deepspec_checkpoint
        from ...formats.eagle import is_eagle_checkpoint, load_eagle_checkpoint

        wants_info = kwargs.pop("output_loading_info", False)
        target_layers = None if target_model is None else target_model.config.get_text_config().num_hidden_layers
        model, info = cls.load_draft_checkpoint(
            pretrained_model_name_or_path,
            *model_args,
            reference_layouts=[
                (is_eagle3_deepspec_checkpoint, load_eagle3_deepspec_checkpoint),
                (is_eagle_checkpoint, partial(load_eagle_checkpoint, num_target_layers=target_layers)),
            ],
            allow_missing_weights=allow_missing_weights,
            **kwargs,
        )
        model.bind_loaded(target_model, kwargs.get("device_map"))
        return (model, info) if wants_info else model


__all__ = [
    "Eagle3Cache",
    "Eagle3DecoderLayer",
    "Eagle3DraftModel",
    "Eagle3DraftOutput",
    "Eagle3LlamaAttention",
    "Eagle3PreTrainedModel",
    "Eagle3TTTOutput",
    "ttt_attention_mask",
]
