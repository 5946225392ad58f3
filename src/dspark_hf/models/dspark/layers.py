"""Backbone building blocks of a DSpark draft (the Qwen3-style layer): RMSNorm, RoPE, attention of block queries over
[context ; block] keys and values, SwiGLU MLP, decoder layer. The Gemma 4 variants are in `gemma4_layers.py`."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dspark import DSparkDraftConfig


class DSparkRMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned scale: `(..., d)` → `(..., d)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class DSparkRotaryEmbedding(nn.Module):
    """RoPE tables for arbitrary position ids; supports every rope type transformers knows."""

    def __init__(self, config: DSparkDraftConfig):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @property
    def rope_init_fn(self):
        if self.rope_type == "default":
            return self.compute_default_rope_parameters
        return ROPE_INIT_FUNCTIONS[self.rope_type]

    @staticmethod
    def compute_default_rope_parameters(config: DSparkDraftConfig, device=None, seq_len=None):
        base = (config.rope_parameters or {}).get("rope_theta", 10000.0)
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(batch, len)` positions → cos, sin of shape `(batch, len, head_dim)`."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: `(batch, heads, len, head_dim)`; cos/sin: `(batch, len, head_dim)`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class DSparkAttention(nn.Module):
    """Attention of block queries over [context K/V ; block K/V] (paper eq. 3).

    The q/k/v projections read `input_size` features (default `hidden_size`; an EAGLE-3 layer feeds
    `[embedding ; hidden]`, 2·hidden wide) and `o_proj` writes `hidden_size`.
    """

    def __init__(self, config: DSparkDraftConfig, layer_idx: int, input_size: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = config.attention_scale if config.attention_scale is not None else self.head_dim**-0.5
        bias, width = config.attention_bias, input_size or config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DSparkRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DSparkRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def queries(self, states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """States `(batch, len, input_size)` → normed, rotated queries `(batch, heads, len, head_dim)`."""
        batch, length, _ = states.shape
        queries = self.q_norm(self.q_proj(states).view(batch, length, self.num_heads, self.head_dim))
        return apply_rotary(queries.transpose(1, 2), *rope)

    def keys_values(
        self, states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States `(batch, len, input_size)` → keys, values `(batch, kv_heads, len, head_dim)`."""
        batch, length, _ = states.shape
        keys = self.k_norm(self.k_proj(states).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        values = self.v_proj(states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(keys, *rope), values

    def forward(
        self,
        hidden_states: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        queries = self.queries(hidden_states, block_rope)
        keys, values = self.keys_values(hidden_states, block_rope)
        if context is not None:
            keys = torch.cat([context[0], keys], dim=-2)
            values = torch.cat([context[1], values], dim=-2)
        return self.attend(queries, keys, values, attention_mask)

    def attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Queries `(batch, heads, q, head_dim)` over keys/values `(batch, kv_heads, kv, head_dim)` with a boolean
        mask `(batch, 1, q, kv)` (True = may attend; None = everything) → `o_proj` output `(batch, q, hidden)`."""
        batch, _, q_len, _ = queries.shape
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            scores = torch.matmul(queries, keys.transpose(-1, -2)) * self.scaling
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores.float(), dim=-1).to(queries.dtype)
            probs = F.dropout(probs, p=dropout, training=self.training)
            output = torch.matmul(probs, values)
        else:
            output = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=attention_mask, dropout_p=dropout, scale=self.scaling
            )
        output = output.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        return self.o_proj(output)


class DSparkMLP(nn.Module):
    """Gated MLP `down(act(gate(x)) · up(x))`, `(..., d)` → `(..., d)`; `intermediate_size` defaults to the config's."""

    def __init__(self, config: DSparkDraftConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DSparkDecoderLayer(nn.Module):
    """Pre-norm layer (Qwen3 style): h += attn(norm(h)); h += mlp(norm(h)). Block states `(batch, q, d)`."""

    def __init__(self, config: DSparkDraftConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DSparkAttention(config, layer_idx)
        self.mlp = DSparkMLP(config)
        self.input_layernorm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attention = self.self_attn(self.input_layernorm(hidden_states), block_rope, context, attention_mask)
        hidden_states = hidden_states + attention
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
