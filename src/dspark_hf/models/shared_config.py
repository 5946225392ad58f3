"""Configuration pieces every draft family shares: the two layer designs (`draft_architecture`), their validation and
the Gemma 4 MLP-width rule. Used by [`DSparkDraftConfig`] and [`Eagle3DraftConfig`] as a mixin (methods only, no
fields: each config declares its own)."""

import math

# Layer designs of a draft backbone: the reference's two draft families (DeepSpec's Qwen3 and Gemma 4 drafts).
# "qwen3" is every draft's default; "gemma4" is what from_target picks for a Gemma 4 target.
DRAFT_ARCHITECTURES = ("qwen3", "gemma4")


def check_positive_integers(owner: str, values: dict[str, object]) -> None:
    """Raises `ValueError` naming `owner.field` for the first value that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}.")


class DraftLayerConfigMixin:
    """Methods of a draft config with the fields `draft_architecture`, `attention_k_eq_v`, `use_double_wide_mlp`,
    `num_kv_shared_layers`, `attention_scale`, `num_hidden_layers`, `intermediate_size`, `num_attention_heads` and
    `num_key_value_heads`."""

    def mlp_intermediate_size(self, layer_idx: int) -> int:
        """Width of the MLP of draft layer `layer_idx`: `intermediate_size`, doubled with `use_double_wide_mlp` for
        layers `>= num_hidden_layers - num_kv_shared_layers` when that bound is > 0 (the reference's rule)."""
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        double = self.use_double_wide_mlp and layer_idx >= first_shared > 0
        return self.intermediate_size * (2 if double else 1)

    def _validate_heads(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )

    def _validate_architecture(self, designs: tuple[str, ...] = DRAFT_ARCHITECTURES) -> None:
        """Checks the layer design (one of `designs`) and the fields only the Gemma 4 design has."""
        if self.draft_architecture not in designs:
            raise ValueError(f"draft_architecture must be one of {designs}, got {self.draft_architecture!r}.")
        if self.draft_architecture != "gemma4":
            for name in ("attention_k_eq_v", "use_double_wide_mlp"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name}=True needs draft_architecture='gemma4' (a Gemma 4 draft layer); this config has "
                        f"draft_architecture={self.draft_architecture!r}."
                    )
        if not isinstance(self.num_kv_shared_layers, int) or self.num_kv_shared_layers < 0:
            raise ValueError(f"num_kv_shared_layers must be an integer >= 0, got {self.num_kv_shared_layers!r}.")
        scale = self.attention_scale
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"attention_scale must be a finite number > 0 or None (head_dim ** -0.5), got {scale!r}.")

    def _validate_draft_vocab_size(self) -> None:
        size = self.draft_vocab_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= self.vocab_size):
            raise ValueError(
                f"draft_vocab_size must be an integer in [1, vocab_size={self.vocab_size}] or None (whole vocabulary), "
                f"got {size!r}."
            )


__all__ = ["DRAFT_ARCHITECTURES", "DraftLayerConfigMixin", "check_positive_integers"]
