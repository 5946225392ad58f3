"""The Gemma 4 draft layer (`draft_architecture="gemma4"`, the reference's `Gemma4DSparkModel`): Gemma's float32
RMSNorm, attention with per-head q/k/v norms and scale 1.0 (optionally values = keys before `k_norm`), sandwich
norms around attention and MLP, and a `layer_scalar` buffer. Also the √d-scaled embedding a reference Gemma 4
checkpoint's own table is used with until a target is attached."""

import torch
from torch import nn

from .configuration_dspark import DSparkDraftConfig
from .layers import DSparkAttention, DSparkMLP, apply_rotary


class DSparkGemma4RMSNorm(nn.Module):
    """Gemma 4's RMSNorm: computed in float32, multiplied by `weight` (not 1 + weight) and cast back;
    `with_scale=False` has no weight (the value norm). `(..., dim)` → `(..., dim)`."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = hidden_states.float()
        normed = normed * torch.pow(normed.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            normed = normed * self.weight.float()
        return normed.type_as(hidden_states)


class DSparkGemma4Attention(DSparkAttention):
    """Block queries over [context ; block] keys and values, Gemma 4 style.

    q = q_norm(q_proj(x)), k = k_norm(k_proj(x)), v = v_norm(v_proj(x)) or, with `attention_k_eq_v`, v = v_norm of
    the same k_proj output (no `v_proj`); `v_norm` has no weight. The scale is `config.attention_scale` (1.0).
    """

    def __init__(self, config: DSparkDraftConfig, layer_idx: int, input_size: int | None = None):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = config.attention_scale if config.attention_scale is not None else self.head_dim**-0.5
        bias, eps, width = config.attention_bias, config.rms_norm_eps, input_size or config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = None if config.attention_k_eq_v else nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DSparkGemma4RMSNorm(self.head_dim, eps=eps)
        self.k_norm = DSparkGemma4RMSNorm(self.head_dim, eps=eps)
        self.v_norm = DSparkGemma4RMSNorm(self.head_dim, eps=eps, with_scale=False)

    def keys_values(
        self, states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States `(batch, len, input_size)` → keys, values `(batch, kv_heads, len, head_dim)`."""
        shape = (*states.shape[:2], self.num_kv_heads, self.head_dim)
        projected = self.k_proj(states).view(shape)
        values = projected if self.v_proj is None else self.v_proj(states).view(shape)
        keys = self.k_norm(projected).transpose(1, 2)
        return apply_rotary(keys, *rope), self.v_norm(values).transpose(1, 2)


class DSparkGemma4DecoderLayer(nn.Module):
    """h = h + post_attention_norm(attn(input_norm(h))); h = (h + post_ff_norm(mlp(pre_ff_norm(h)))) · layer_scalar.

    The MLP is `down(gelu_tanh(gate(x)) · up(x))` (the config's `hidden_act`), double-wide where
    [`DSparkDraftConfig.mlp_intermediate_size`] says so. Block states `(batch, q, d)`.
    """

    def __init__(self, config: DSparkDraftConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DSparkGemma4Attention(config, layer_idx)
        self.mlp = DSparkMLP(config, config.mlp_intermediate_size(layer_idx))
        self.input_layernorm = DSparkGemma4RMSNorm(d, eps=eps)
        self.post_attention_layernorm = DSparkGemma4RMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm = DSparkGemma4RMSNorm(d, eps=eps)
        self.post_feedforward_layernorm = DSparkGemma4RMSNorm(d, eps=eps)
        # Persistent (the reference's checkpoints store it, always 1.0); no optimizer should move it.
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attention = self.self_attn(self.input_layernorm(hidden_states), block_rope, context, attention_mask)
        hidden_states = hidden_states + self.post_attention_layernorm(attention)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_feedforward_layernorm(mlp)
        return hidden_states * self.layer_scalar


class DSparkScaledEmbedding(nn.Embedding):
    """An embedding table whose output is multiplied by `scale` cast to the table's dtype (Gemma's scaled word
    embedding): ids `(...)` → `(..., d)`. The weight is the unscaled table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.scalar_embed_scale = scale
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


__all__ = ["DSparkGemma4Attention", "DSparkGemma4DecoderLayer", "DSparkGemma4RMSNorm", "DSparkScaledEmbedding"]
