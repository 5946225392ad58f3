"""Configuration of an EAGLE-3 draft model."""

import math

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from ..shared_config import DRAFT_ARCHITECTURES, DraftLayerConfigMixin, check_positive_integers

# Layer designs of an EAGLE-3 draft: the shared ones, and the Llama layer of EAGLE / SpecForge / vLLM checkpoints.
EAGLE3_DRAFT_ARCHITECTURES = (*DRAFT_ARCHITECTURES, "llama")


class Eagle3DraftConfig(DraftLayerConfigMixin, PreTrainedConfig):
    r"""
    Configuration of an [`Eagle3DraftModel`]: an autoregressive draft that fuses hidden states of several target
    layers (`fc`) and runs decoder layers whose attention reads `[input_layernorm(embedding) ; hidden_norm(hidden)]`,
    trained by training-time test (TTT) over `ttt_length` steps.

    Most users build it with [`Eagle3DraftModel.from_target`]. Every value is validated on construction; a bad value
    raises `ValueError` naming the field.

    Args:
        vocab_size (`int`): Vocabulary size; must equal the target's (the draft reuses its embedding and LM head).
        hidden_size (`int`): Width d of the draft (the target's, since the embedding is shared).
        intermediate_size (`int`): Width of the gated MLP of each draft layer.
        num_hidden_layers (`int`): Number of draft decoder layers (1 in EAGLE-3 and in the reference's recipes).
        num_attention_heads (`int`), num_key_value_heads (`int`, *optional*), head_dim (`int`, *optional*):
            Attention geometry (grouped-query attention when `num_key_value_heads < num_attention_heads`). For a
            Gemma 4 draft: `global_head_dim`, and `num_global_key_value_heads` with `attention_k_eq_v`.
        hidden_act (`str`): MLP activation.
        draft_architecture (`str`): `"qwen3"` (pre-norm layer, h += attn(a); h += mlp(norm(h)); RMSNorm on
            queries and keys), `"llama"` (the same without `q_norm` / `k_norm`: the layer of EAGLE, SpecForge and
            vLLM checkpoints, see `dspark_hf.formats.eagle`) or `"gemma4"` (sandwich norms, Gemma's float32 RMSNorm,
            value norm without weight, `layer_scalar`).
        attention_scale (`float`, *optional*): Factor on q·k; None means `head_dim ** -0.5` (Gemma 4 drafts: 1.0).
        attention_k_eq_v (`bool`), use_double_wide_mlp (`bool`), num_kv_shared_layers (`int`): Gemma 4 options, as
            for [`DSparkDraftConfig`].
        max_position_embeddings (`int`), rope_parameters (`dict`, *optional*), rms_norm_eps (`float`),
            attention_bias (`bool`), attention_dropout (`float`): as in transformers (copied from the target).
        num_target_layers (`int`, *optional*): Number of decoder layers of the target.
        target_layer_ids (`list[int]`): Target decoder layers whose outputs are concatenated (in this order) into
            the input of `fc`, which is `len(target_layer_ids) * hidden_size` wide. Layer `i` is `hidden_states[i + 1]`
            in transformers. The target's last layer is accepted here (the reference's trainer reads raw layer
            outputs through hooks) but refused by [`Eagle3DraftModel.attach`], since transformers returns it only
            after the final norm.
        ttt_length (`int`): Training-time-test steps of the training forward and loss, and the number of tokens the
            reference's evaluator drafts per round.
        step_loss_decay (`float`): Weight of TTT step k's loss is `step_loss_decay ** k`.
        draft_vocab_size (`int`, *optional*): Size of the draft vocabulary (a sorted subset of the target's ids,
            buffer `draft_vocab_ids`, set with [`Eagle3DraftModel.set_draft_vocabulary`]); None = whole vocabulary.
        use_draft_lm_head (`bool`): The draft has its own LM head `draft_lm_head` (`draft_vocab_size` or
            `vocab_size` rows, no bias, saved with the draft; EAGLE and SpecForge checkpoints train one) instead of
            reading the target's LM-head rows.
        embedding_scale (`float`): Factor on token embeddings (√d for Gemma-family targets whose embedding module
            does not scale).
        final_logit_softcapping (`float`, *optional*): Logit soft-capping of the target, applied to draft logits.
    """

    model_type = "eagle3"

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
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    draft_vocab_size: int | None = None
    use_draft_lm_head: bool = False
    embedding_scale: float = 1.0
    final_logit_softcapping: float | None = None
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
        super().__post_init__(**kwargs)
        self.validate_eagle3()

    @property
    def fused_feature_size(self) -> int:
        """Width of the concatenated target features `fc` reads: `len(target_layer_ids) * hidden_size`."""
        return len(self.target_layer_ids) * self.hidden_size

    def validate_eagle3(self) -> None:
        """Checks every field; raises `ValueError` naming the field, its value and the fix."""
        check_positive_integers(
            "Eagle3DraftConfig",
            {
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "ttt_length": self.ttt_length,
            },
        )
        self._validate_heads()
        self._validate_architecture(EAGLE3_DRAFT_ARCHITECTURES)
        self._validate_draft_vocab_size()
        if not isinstance(self.use_draft_lm_head, bool):
            raise ValueError(
                f"Eagle3DraftConfig.use_draft_lm_head must be True or False, got {self.use_draft_lm_head!r}."
            )
        ids = self.target_layer_ids
        if not ids or any(i < 0 for i in ids) or sorted(set(ids)) != ids:
            raise ValueError(
                f"Eagle3DraftConfig.target_layer_ids must be one or more distinct, increasing decoder-layer ids >= 0, "
                f"got {ids}."
            )
        if self.num_target_layers is not None and ids[-1] > self.num_target_layers - 1:
            raise ValueError(
                f"Eagle3DraftConfig.target_layer_ids={ids} reaches layer {ids[-1]} but num_target_layers is "
                f"{self.num_target_layers}; use ids <= {self.num_target_layers - 1}."
            )
        decay = self.step_loss_decay
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not (math.isfinite(decay) and decay > 0):
            raise ValueError(
                f"Eagle3DraftConfig.step_loss_decay must be a finite number > 0 (step k weighs decay**k), got {decay!r}."
            )
        if not self.embedding_scale > 0:
            raise ValueError(f"Eagle3DraftConfig.embedding_scale must be > 0, got {self.embedding_scale}.")
        cap = self.final_logit_softcapping
        if cap is not None and not cap > 0:
            raise ValueError(
                f"Eagle3DraftConfig.final_logit_softcapping must be > 0 or None (no capping), got {cap!r}."
            )


__all__ = ["EAGLE3_DRAFT_ARCHITECTURES", "Eagle3DraftConfig"]
