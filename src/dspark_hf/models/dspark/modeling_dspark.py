"""DSpark draft model: parallel backbone with KV injection, sequential heads and confidence head.

The backbone's layers are in `layers.py` (the Qwen3-style layer) and `gemma4_layers.py` (the reference's Gemma 4
layer); `config.draft_architecture` picks one."""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from ...compat import UploadHook
from ...model_card import DSparkModelCardData, load_model_card_data, save_model_card
from ..shared import DraftKVCache, TargetBoundDraftMixin
from .configuration_dspark import DSparkDraftConfig
from .gemma4_layers import DSparkGemma4DecoderLayer, DSparkGemma4RMSNorm
from .heads import DSparkConfidenceHead, DSparkGatedMarkovHead, DSparkMarkovHead, DSparkRNNHead
from .layers import DSparkDecoderLayer, DSparkRMSNorm, DSparkRotaryEmbedding

logger = logging.get_logger(__name__)

# The decoder layer and RMSNorm of each `config.draft_architecture`.
_LAYER_CLASSES = {"qwen3": DSparkDecoderLayer, "gemma4": DSparkGemma4DecoderLayer}
_NORM_CLASSES = {"qwen3": DSparkRMSNorm, "gemma4": DSparkGemma4RMSNorm}


def target_hidden_state_indices(target_layer_ids: Sequence[int]) -> list[int]:
    """Where the outputs of decoder layers `target_layer_ids` sit in a transformers `hidden_states` tuple (entry 0
    is the embedding output, so layer `i` is entry `i + 1`). Also what `output_hidden_states=` takes to return
    only those entries."""
    return [i + 1 for i in target_layer_ids]


def select_target_features(hidden_states: tuple[torch.Tensor, ...], target_layer_ids: Sequence[int]) -> torch.Tensor:
    """Concatenates the outputs of decoder layers `target_layer_ids` from a transformers `hidden_states` tuple into
    context features `(batch, seq, len(ids) * hidden)`."""
    return torch.cat([hidden_states[i] for i in target_hidden_state_indices(target_layer_ids)], dim=-1)


class DSparkContextCache(DraftKVCache):
    """Keys and values of the injected target context, one entry per draft layer.

    Only context entries are stored: block entries are recomputed every round and never cached.
    Tensors are `(batch, num_key_value_heads, context_length, head_dim)`.
    """


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DSparkDraftOutput(ModelOutput):
    """Output of a draft forward.

    Args:
        logits: without `prev_ids`, `(batch, q, vocab)` base logits U_k (before the sequential head); with them
            (training), `(batch, num_blocks, γ, V')` teacher-forced block logits U_k + B_k over the draft vocabulary
            (`V' = vocab` without one).
        confidence_logits: with `prev_ids`, `(batch, num_blocks, γ)` raw confidence logits (None without a
            confidence head).
        hidden_states: `(batch, q, hidden)` final-norm backbone states h_k; `(batch, num_blocks, γ, hidden)` with
            `prev_ids`.
        cache: the context cache, when one was used.
    """

    logits: torch.FloatTensor | None = None
    confidence_logits: torch.FloatTensor | None = None
    hidden_states: torch.FloatTensor | None = None
    cache: DSparkContextCache | None = None


class DSparkPreTrainedModel(UploadHook, PreTrainedModel):
    config_class = DSparkDraftConfig
    base_model_prefix = "dspark"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DSparkDecoderLayer", "DSparkGemma4DecoderLayer"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"^embed_tokens\.", r"^lm_head\."]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DSparkMarkovHead):
            # A zero transition matrix starts the draft exactly at its DFlash backbone.
            nn.init.zeros_(module.markov_w2.weight)
        elif isinstance(module, DSparkGemma4DecoderLayer):
            init.ones_(module.layer_scalar)


class DSparkDraftModel(TargetBoundDraftMixin, DSparkPreTrainedModel):
    """A DSpark draft for a frozen causal-LM target.

    The draft borrows the target's input embedding and LM head (bound by [`attach`], never stored in its own
    checkpoint). Use it as `target.generate(input_ids, assistant_model=draft)`.
    """

    def __init__(self, config: DSparkDraftConfig):
        super().__init__(config)
        if config.mask_token_id is None:
            raise ValueError(
                "DSparkDraftConfig.mask_token_id is not set; build the draft with DSparkDraftModel.from_target(target) "
                "or pass mask_token_id= (a reserved or unused special token of the target's tokenizer)."
            )
        self.fc = nn.Linear(len(config.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        norm_class, layer_class = _NORM_CLASSES[config.draft_architecture], _LAYER_CLASSES[config.draft_architecture]
        self.hidden_norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DSparkRotaryEmbedding(config)
        head_classes = {"markov": DSparkMarkovHead, "gated": DSparkGatedMarkovHead, "rnn": DSparkRNNHead}
        self.markov_head = head_classes[config.markov_head_type](config) if config.has_sequential_head else None
        self.confidence_head = DSparkConfidenceHead(config) if config.confidence_head else None
        # The borrowed target modules and the draft vocabulary (`draft_vocab_ids`; see set_draft_vocabulary).
        self._init_target_binding()
        # What the README.md written by save_pretrained reports beyond the config (target, training, τ, calibration).
        self.model_card_data = DSparkModelCardData()
        self.post_init()

    # -- binding to the target -------------------------------------------------------------------------------------

    @classmethod
    def from_target(cls, target: PreTrainedModel, tokenizer=None, **overrides) -> "DSparkDraftModel":
        """Builds a fresh, randomly initialised draft for `target` (any transformers causal LM) and attaches it.

        Width, vocabulary, attention geometry (of the target's full-attention layers) and RoPE settings are copied
        from the target; a Gemma 4 target (`Gemma4ForCausalLM` or the multimodal `Gemma4ForConditionalGeneration`)
        gets the reference's Gemma 4 draft layer (`draft_architecture="gemma4"`). `overrides` set any
        [`DSparkDraftConfig`] field (e.g. `num_hidden_layers=2, block_size=8, markov_head_type="rnn"`).
        Pass the target's `tokenizer` so that `mask_token_id` is chosen among its unused special tokens.
        """
        from ...targets import draft_config_from_target

        config = draft_config_from_target(target, tokenizer=tokenizer, **overrides)
        draft = cls(config).to(dtype=target.dtype, device=target.device)
        draft.model_card_data.base_model = target.name_or_path or None
        return draft.attach(target)

    # -- computation -----------------------------------------------------------------------------------------------

    def compute_logits(self, hidden_states: torch.Tensor, draft_vocabulary: bool = False) -> torch.Tensor:
        """Hidden states `(..., hidden)` → logits `(..., vocab)` through the target's LM head.

        With `draft_vocabulary=True` and a draft vocabulary set, only its tokens' logits are computed:
        `(..., draft_vocab_size)`, in the order of `draft_vocab_ids`.
        """
        return self.lm_head_logits(hidden_states, draft_vocabulary)

    def set_draft_vocabulary(self, token_ids: Sequence[int] | torch.Tensor | None) -> "DSparkDraftModel":
        """Restricts drafting to `token_ids`, or drafts over the whole vocabulary again with `None`.

        The LM head and the sequential head then compute `len(token_ids)` logits per drafted token instead of
        `vocab_size` (on a CPU the draft pass is mostly the LM head's weight reads). Tokens outside get draft
        probability 0; verification is unchanged, so decoding stays lossless, and only the acceptance of targets'
        tokens outside the set is lost. Choose frequent tokens of the target's own responses, e.g. with
        [`dspark_hf.training.frequent_token_ids`]. Set before training, it also restricts the training losses to
        these tokens (see [`dspark_hf.training.compute_dspark_loss`]). Saved with the draft
        (`config.draft_vocab_size` and the buffer `draft_vocab_ids`).
        """
        return super().set_draft_vocabulary(token_ids)

    def add_layers(self, num_layers: int) -> "DSparkDraftModel":
        """Appends `num_layers` decoder layers that start as the identity, to train a deeper draft from this one.

        Each new layer's attention output and MLP down projections are zero, so right after the call the draft
        computes exactly what it did before; training then grows the new layers from there. Updates
        `config.num_hidden_layers` (and a non-zero `num_kv_shared_layers` by as many, so that the existing layers keep
        their MLP widths).
        """
        if num_layers < 1:
            raise ValueError(f"add_layers needs a positive number of layers, got {num_layers}.")
        reference = self.fc.weight
        existing = len(self.layers)
        self.config.num_hidden_layers = existing + num_layers
        if self.config.num_kv_shared_layers:
            self.config.num_kv_shared_layers += num_layers
        for index in range(existing, existing + num_layers):
            layer = _LAYER_CLASSES[self.config.draft_architecture](self.config, index)
            layer.apply(self._init_weights)
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
            self.layers.append(layer.to(dtype=reference.dtype, device=reference.device))
        return self

    def project_context(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """Concatenated target features `(batch, c, m·d)` → context states H_ctx `(batch, c, d)` (paper eq. 2)."""
        return self.hidden_norm(self.fc(target_hidden_states.to(self.fc.weight.dtype)))

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        target_hidden_states: torch.Tensor | None = None,
        context_position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: DSparkContextCache | None = None,
        use_cache: bool = False,
        compute_logits: bool = True,
        prev_ids: torch.LongTensor | None = None,
    ) -> DSparkDraftOutput:
        """Runs the backbone over block inputs; with `prev_ids` (training) also the sequential and confidence heads.

        Args:
            input_ids: `(batch, q)` block inputs: each block is its anchor followed by γ−1 `mask_token_id`s.
            position_ids: `(batch, q)` RoPE positions of the block inputs (the anchor keeps its sequence position).
            target_hidden_states: `(batch, c, m·d)` new context features from [`select_target_features`].
            context_position_ids: `(batch, c)` sequence positions of those features.
            attention_mask: `(batch, 1, q, C + q)` boolean, True where attention is allowed, over
                [all context (cached + new) ; block]. `None` lets every block position see all context and the block.
            cache: a [`DSparkContextCache`] of earlier context; new context is appended to it in place.
            use_cache: return the cache (the given one, or a new one holding this call's context).
            compute_logits: also return base logits through the LM head.
            prev_ids: `(batch, num_blocks, γ)` the token before each block position (the anchor first), for
                teacher forcing: the inputs then hold `num_blocks` blocks of γ positions, and the output holds the
                block logits U_k + B_k and the confidence logits of every position (paper §3.3), all in this one
                forward, so that wrappers (DDP, PEFT) see every trained module.
        """
        if target_hidden_states is not None and target_hidden_states.shape[1] > 0:
            if context_position_ids is None:
                raise ValueError("context_position_ids must be given together with target_hidden_states.")
            if cache is None:
                cache = DSparkContextCache(self.config.num_hidden_layers)
            self.extend_context(cache, target_hidden_states, context_position_ids)
        hidden_states = self.embed(input_ids)
        block_rope = self.rotary_emb(position_ids, hidden_states.dtype)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.bool()
        for i, layer in enumerate(self.layers):
            context = cache.layer(i) if cache is not None else None
            hidden_states = layer(hidden_states, block_rope, context, attention_mask)
        hidden_states = self.norm(hidden_states)
        cache = cache if use_cache else None
        if prev_ids is not None:
            blocks = hidden_states.view(*prev_ids.shape, -1)
            base = self.compute_logits(blocks, draft_vocabulary=True)
            return DSparkDraftOutput(
                logits=self.sequential_logits(base, blocks, prev_ids, draft_vocabulary=True),
                confidence_logits=self.confidence_logits(blocks, prev_ids),
                hidden_states=blocks,
                cache=cache,
            )
        logits = self.compute_logits(hidden_states) if compute_logits else None
        return DSparkDraftOutput(logits=logits, hidden_states=hidden_states, cache=cache)

    def extend_context(
        self, cache: DSparkContextCache, target_hidden_states: torch.Tensor, context_position_ids: torch.LongTensor
    ) -> None:
        """Appends new context to `cache`: features `(batch, c, m·d)` at positions `(batch, c)`.

        Every layer attends to the same projected context H_ctx, so its keys and values do not depend on the block.
        """
        context_states = self.project_context(target_hidden_states)
        rope = self.rotary_emb(context_position_ids, context_states.dtype)
        for i, layer in enumerate(self.layers):
            cache.update(i, *layer.self_attn.keys_values(context_states, rope))

    def previous_token_features(self, prev_ids: torch.LongTensor) -> torch.Tensor | None:
        """W1[x_{k−1}] `(..., r)` for the confidence head, or None when it reads the hidden state alone."""
        if self.markov_head is None or not self.config.confidence_head_with_markov:
            return None
        return self.markov_head.token_features(prev_ids)

    def sequential_logits(
        self,
        base_logits: torch.Tensor,
        hidden_states: torch.Tensor,
        prev_ids: torch.LongTensor,
        draft_vocabulary: bool = False,
    ) -> torch.Tensor:
        """Teacher-forced block logits U_k + B_k: base `(..., γ, V)`, hidden `(..., γ, d)`, prev `(..., γ)`.

        With `draft_vocabulary=True` and a draft vocabulary set, base and result are `(..., γ, V')` (see
        [`compute_logits`]).
        """
        if self.markov_head is None:
            return base_logits
        weight = self.sequential_head_output_weight(draft_vocabulary)
        bias = self.markov_head.teacher_forced(prev_ids, hidden_states, weight)
        return base_logits + bias.to(base_logits.dtype)

    def sequential_head_output_weight(self, draft_vocabulary: bool = True) -> torch.Tensor | None:
        """The draft-vocabulary rows `(V', r)` of the sequential head's W2 when `draft_vocabulary` and a draft
        vocabulary are set (its logits then match [`compute_logits`]'s), else None: W2 itself."""
        if self.markov_head is None or not draft_vocabulary or self.draft_vocab_ids is None:
            return None
        return self.draft_vocabulary_rows(self.markov_head.markov_w2.weight)

    def confidence_logits(self, hidden_states: torch.Tensor, prev_ids: torch.LongTensor) -> torch.Tensor | None:
        """Raw (uncalibrated) confidence logits `(..., γ)`; hidden `(..., γ, d)`, prev `(..., γ)`."""
        if self.confidence_head is None:
            return None
        return self.confidence_head(hidden_states, self.previous_token_features(prev_ids)).float()

    def calibrated_confidence(
        self, confidence_logits: torch.Tensor, positions: slice | None = None
    ) -> torch.Tensor:
        """σ(logit / T_k + b_k) with the config's `calibration_temperatures` and `calibration_biases` (T = 1 and
        b = 0 where unset). `positions` selects the block positions the last dimension holds (default 0, 1, …)."""
        z = confidence_logits

        def per_position(values: list[float]) -> torch.Tensor:
            v = torch.tensor(values, dtype=z.dtype, device=z.device)
            return (v if positions is None else v[positions])[: z.shape[-1]]

        if self.config.calibration_temperatures is not None:
            z = z / per_position(self.config.calibration_temperatures)
        if self.config.calibration_biases is not None:
            z = z + per_position(self.config.calibration_biases)
        return torch.sigmoid(z)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, layout: str = "hf", model_card: bool = True, **kwargs
    ) -> None:
        """Saves the draft (safetensors) and its model card.

        `layout="hf"` (default) writes a transformers checkpoint without the target's embedding and LM head;
        `layout="deepspec"` writes the self-contained reference layout served by vLLM and SGLang. With
        `model_card=True` README.md is created or updated from the config and `self.model_card_data` (its generated
        section is rewritten, other text and metadata are kept; see `dspark_hf.model_card`).
        """
        if layout not in ("hf", "deepspec"):
            raise ValueError(f'layout must be "hf" or "deepspec", got {layout!r}.')
        if layout == "deepspec":
            from ...formats.deepspec import save_deepspec_checkpoint

            save_deepspec_checkpoint(self, save_directory)
        else:
            if "embed_tokens" in self._modules and "state_dict" not in kwargs:
                kwargs["state_dict"] = self.own_state_dict()
            super().save_pretrained(save_directory, *args, **kwargs)
        if model_card and kwargs.get("is_main_process", True):
            save_model_card(self, save_directory, model_id=os.fspath(save_directory), layout=layout)

    def before_upload(self, working_dir: str, repo_id: str) -> None:
        """Used by `push_to_hub` and `save_pretrained(push_to_hub=True)`: transformers puts the Hub's README.md (or a
        placeholder) in `working_dir`; it is updated into this draft's model card before the upload."""
        save_model_card(self, working_dir, model_id=repo_id)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, target_model=None, allow_missing_weights: bool = False, **kwargs
    ):
        """Loads a draft saved in either layout (detected from its config) with the data of its model card;
        attaches `target_model` if given and, unless `device_map` is passed, moves the draft to the target's device
        (`target_model.device`).

        A checkpoint that lacks some of the draft's weights is refused with an error naming them (transformers would
        initialise them randomly with a warning); pass `allow_missing_weights=True` to initialise them. Weights of
        another shape are refused by transformers unless `ignore_mismatched_sizes=True`. With
        `output_loading_info=True` the result is `(model, loading_info)`, as in transformers.
        """
        from ...formats.deepspec import is_deepspec_checkpoint, load_deepspec_checkpoint

        wants_info = kwargs.pop("output_loading_info", False)
        model, info = cls.load_draft_checkpoint(
            pretrained_model_name_or_path,
            *model_args,
            reference_layouts=[(is_deepspec_checkpoint, load_deepspec_checkpoint)],
            allow_missing_weights=allow_missing_weights,
            **kwargs,
        )
        model.model_card_data = load_model_card_data(pretrained_model_name_or_path, **kwargs)
        model.bind_loaded(target_model, kwargs.get("device_map"))
        return (model, info) if wants_info else model


__all__ = [
    "DSparkContextCache",
    "DSparkDraftModel",
    "DSparkDraftOutput",
    "DSparkPreTrainedModel",
    "select_target_features",
    "target_hidden_state_indices",
]
