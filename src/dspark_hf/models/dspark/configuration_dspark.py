"""Configuration of a DSpark draft model."""

import math

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from ..shared_config import DRAFT_ARCHITECTURES, DraftLayerConfigMixin, check_positive_integers

SEQUENTIAL_HEAD_TYPES = ("markov", "gated", "rnn", "none")


class DSparkDraftConfig(DraftLayerConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`DSparkDraftModel`]: a parallel (DFlash-style) backbone conditioned on hidden states
    of a frozen target model, an optional sequential head and an optional confidence head.

    Most users build it with [`DSparkDraftModel.from_target`], which copies width, vocabulary and RoPE
    settings from the target. Every value is validated on construction; a bad value raises `ValueError`.

    Args:
        vocab_size (`int`): Vocabulary size; must equal the target's (the draft reuses its embedding and LM head).
        hidden_size (`int`): Width of the draft backbone (equal to the target's, since the embedding is shared).
        intermediate_size (`int`): Width of the SwiGLU MLP in each draft layer.
        num_hidden_layers (`int`): Number of draft decoder layers.
        num_attention_heads (`int`), num_key_value_heads (`int`, *optional*), head_dim (`int`, *optional*):
            Attention geometry of every draft layer (grouped-query attention when `num_key_value_heads <
            num_attention_heads`). For a Gemma 4 draft these are the target's full-attention (global) values:
            `global_head_dim`, and `num_global_key_value_heads` with `attention_k_eq_v`.
        hidden_act (`str`): MLP activation.
        draft_architecture (`str`): Layer design of the backbone. `"qwen3"` (default): pre-norm layers,
            h += attn(norm(h)); h += mlp(norm(h)). `"gemma4"` (the reference's Gemma 4 draft): sandwich norms,
            h += norm(attn(norm(h))); h = (h + norm(mlp(norm(h)))) · layer_scalar, a value norm without weight,
            Gemma's float32 RMSNorm, and the options below.
        attention_scale (`float`, *optional*): Factor on q·k before the softmax; None means `head_dim ** -0.5`.
            Gemma 4 drafts use 1.0 (their q and k are RMS-normed per head).
        attention_k_eq_v (`bool`): Gemma 4 only: no `v_proj`; the values are the `k_proj` output (before `k_norm`).
        use_double_wide_mlp (`bool`), num_kv_shared_layers (`int`): Gemma 4 only, as in the reference: with
            `use_double_wide_mlp`, draft layers `i >= num_hidden_layers - num_kv_shared_layers > 0` have an MLP of
            twice `intermediate_size` (see [`mlp_intermediate_size`]).
        rope_parameters (`dict`, *optional*): RoPE settings, as in transformers (copied from the target).
        num_target_layers (`int`, *optional*): Number of decoder layers of the target.
        target_layer_ids (`list[int]`): Target layers whose outputs form the context features. Layer `i` means
            the output of decoder layer `i` (`hidden_states[i + 1]` in transformers) and `-1` the embedding output
            (`hidden_states[0]`); the last layer is excluded because transformers returns it after the final norm.
        block_size (`int`): γ, the number of drafted tokens per round (anchor + γ−1 mask tokens as input).
        mask_token_id (`int`): Token whose embedding fills the γ−1 mask positions.
        markov_head_type (`str`): Sequential head: `"markov"` (low-rank first-order transition, paper eq. 5),
            `"gated"` (the transition gated by the hidden state: W2(σ(G[h_k ; W1[x]]) ⊙ W1[x])), `"rnn"` (gated
            recurrent state, eq. 6) or `"none"` (plain DFlash).
        markov_rank (`int`): Rank r of the sequential head.
        confidence_head (`bool`): Whether to add the confidence head (eq. 7).
        confidence_head_with_markov (`bool`): Whether the confidence head also reads the sequential head's
            previous-token feature W1[x_{k−1}] (eq. 7) or the hidden state alone; only meaningful with a sequential
            head.
        calibration_temperatures (`list[float]`, *optional*): One temperature per block position, fitted by
            Sequential Temperature Scaling; confidence logits are divided by them at inference.
        calibration_biases (`list[float]`, *optional*): One bias per block position, added after the temperature:
            c_k = σ(z_k / T_k + b_k). Fitted by `dspark_hf.calibration` with `method="sts_bias"` (an extension
            beyond the paper's STS); None means no bias.
        draft_vocab_size (`int`, *optional*): Size of the draft vocabulary: drafting samples only among these
            `draft_vocab_size` token ids (stored in the checkpoint as the buffer `draft_vocab_ids`), so the LM head
            and the sequential head compute that many logits instead of `vocab_size`. Verification is unchanged and
            stays lossless (tokens outside it simply get draft probability 0). Set it with
            [`DSparkDraftModel.set_draft_vocabulary`]; None drafts over the whole vocabulary.
        embedding_scale (`float`): Factor applied to token embeddings (√hidden for Gemma-family targets).
        final_logit_softcapping (`float`, *optional*): Logit soft-capping of the target, applied to draft logits.
        ce_loss_weight, tv_loss_weight, confidence_loss_weight (`float`): Weights α_ce, α_tv, α_conf of the
            training loss.
        loss_position_decay (`float`): g in the position weight w_k = exp(−(k−1)/g).
    """

    model_type = "dspark"

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 1
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    draft_architecture: str = "qwen3"
    attention_scale: float | None = None
    attention_k_eq_v: bool = False
    use_double_wide_mlp: bool = False
    num_kv_shared_layers: int = 0
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    num_target_layers: int | None = None
    target_layer_ids: list[int] | None = None
    block_size: int = 8
    mask_token_id: int | None = None
    markov_head_type: str = "markov"
    markov_rank: int = 256
    confidence_head: bool = True
    confidence_head_with_markov: bool = True
    calibration_temperatures: list[float] | None = None
    calibration_biases: list[float] | None = None
    draft_vocab_size: int | None = None
    embedding_scale: float = 1.0
    final_logit_softcapping: float | None = None
    ce_loss_weight: float = 0.1
    tv_loss_weight: float = 0.9
    confidence_loss_weight: float = 1.0
    loss_position_decay: float = 4.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.target_layer_ids is None:
            self.target_layer_ids = [0]
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if self.calibration_temperatures is not None:
            self.calibration_temperatures = [float(t) for t in self.calibration_temperatures]
        if self.calibration_biases is not None:
            self.calibration_biases = [float(b) for b in self.calibration_biases]
        super().__post_init__(**kwargs)
        self.validate_dspark()

    @property
    def has_sequential_head(self) -> bool:
        return self.markov_head_type != "none"

    def validate_dspark(self) -> None:
        """Checks every DSpark field; raises `ValueError` naming the field, its value and the fix."""
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
        }
        check_positive_integers("DSparkDraftConfig", positive)
        self._validate_heads()
        if self.markov_head_type not in SEQUENTIAL_HEAD_TYPES:
            raise ValueError(
                f"markov_head_type must be one of {SEQUENTIAL_HEAD_TYPES}, got {self.markov_head_type!r} "
                '("none" gives a plain DFlash draft).'
            )
        if self.has_sequential_head and (not isinstance(self.markov_rank, int) or self.markov_rank < 1):
            raise ValueError(
                f"markov_rank must be a positive integer when markov_head_type={self.markov_head_type!r}, "
                f"got {self.markov_rank!r}."
            )
        self._validate_target_layer_ids()
        self._validate_architecture()
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is outside the vocabulary [0, {self.vocab_size}); pick a "
                "reserved or unused special token of the target's tokenizer."
            )
        if self.calibration_temperatures is not None:
            if len(self.calibration_temperatures) != self.block_size:
                raise ValueError(
                    f"calibration_temperatures has {len(self.calibration_temperatures)} entries but block_size is "
                    f"{self.block_size}; give one temperature per block position (or None)."
                )
            if not all(math.isfinite(t) and t > 0 for t in self.calibration_temperatures):
                raise ValueError(
                    f"calibration_temperatures must all be finite and > 0, got {self.calibration_temperatures}."
                )
        if self.calibration_biases is not None:
            if len(self.calibration_biases) != self.block_size:
                raise ValueError(
                    f"calibration_biases has {len(self.calibration_biases)} entries but block_size is "
                    f"{self.block_size}; give one bias per block position (or None for no bias)."
                )
            if not all(math.isfinite(b) for b in self.calibration_biases):
                raise ValueError(
                    f"calibration_biases must all be finite, got {self.calibration_biases}; refit them or set None."
                )
        self._validate_draft_vocab_size()
        for name in ("ce_loss_weight", "tv_loss_weight", "confidence_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.loss_position_decay <= 0:
            raise ValueError(f"loss_position_decay must be > 0, got {self.loss_position_decay}.")
        if self.embedding_scale <= 0:
            raise ValueError(f"embedding_scale must be > 0, got {self.embedding_scale}.")

    def _validate_target_layer_ids(self) -> None:
        ids = self.target_layer_ids
        if not ids:
            raise ValueError("target_layer_ids must name at least one target layer.")
        if any(i < -1 for i in ids) or sorted(set(ids)) != ids:
            raise ValueError(
                f"target_layer_ids must be distinct, increasing and >= -1 (-1: the embedding output), got {ids}."
            )
        if self.num_target_layers is not None and ids[-1] > self.num_target_layers - 2:
            raise ValueError(
                f"target_layer_ids={ids} reaches layer {ids[-1]} but the target has {self.num_target_layers} layers; "
                f"use ids <= {self.num_target_layers - 2} (transformers returns the last layer only after the "
                "final norm, which is not a usable context feature)."
            )


__all__ = ["DRAFT_ARCHITECTURES", "DSparkDraftConfig"]
