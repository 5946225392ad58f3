"""What every draft family shares: a per-layer KV cache with rollback, and the binding to a frozen target (its input
embedding and LM head borrowed, never saved; an optional draft vocabulary).

[`TargetBoundDraftMixin`] goes before `PreTrainedModel` in a draft class's bases; the class calls
`_init_target_binding()` in `__init__` (after creating its `fc` layer) and has a `config` with `vocab_size`,
`hidden_size`, `target_layer_ids`, `num_target_layers`, `embedding_scale`, `final_logit_softcapping` and
`draft_vocab_size`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

# State-dict prefixes of the borrowed target modules: never written to a draft's own (HF-layout) checkpoint.
SHARED_WEIGHT_PREFIXES = ("embed_tokens.", "lm_head.")


class DraftKVCache:
    """Keys and values per draft layer, appended position by position; `crop(length)` rolls back.

    Tensors are `(batch, num_key_value_heads, length, head_dim)`.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Appends new keys/values of one layer."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = keys, values
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], keys], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], values], dim=-2)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached keys, values of one layer, or None while the cache is empty."""
        if self.keys[layer_idx] is None:
            return None
        return self.keys[layer_idx], self.values[layer_idx]

    def crop(self, length: int) -> None:
        """Keeps the first `length` positions."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k[..., :length, :], v[..., :length, :]


class TargetBoundDraftMixin:
    """Binding of a draft to a frozen target: [`attach`], the borrowed embedding and LM head, and the optional draft
    vocabulary (`draft_vocab_ids`, a sorted subset of the target's token ids that drafting samples among)."""

    def _init_target_binding(self) -> None:
        vocab_ids = None if self.config.draft_vocab_size is None else torch.arange(self.config.draft_vocab_size)
        self.register_buffer("draft_vocab_ids", vocab_ids)
        self._vocabulary_rows: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._shared_modules: tuple[nn.Module, nn.Module] | None = None

    def attach(self, target: PreTrainedModel):
        """Binds the target's (frozen) input embedding and LM head; checks that the target matches this draft."""
        from ..targets import check_target_compatible

        check_target_compatible(self.config, target)
        self._shared_modules = (target.get_input_embeddings(), target.get_output_embeddings())
        self._vocabulary_rows.clear()  # copies of another target's LM-head rows would only hold memory
        for name in ("embed_tokens", "lm_head"):
            if name in self._modules:
                del self._modules[name]
        return self

    @property
    def is_attached(self) -> bool:
        return self._shared_modules is not None or "embed_tokens" in self._modules

    def is_attached_to(self, target: PreTrainedModel) -> bool:
        """Whether this draft borrows `target`'s input embedding (it was attached to `target`)."""
        return self._shared_modules is not None and self._shared_modules[0] is target.get_input_embeddings()

    def _shared(self) -> tuple[nn.Module, nn.Module | None]:
        if self._shared_modules is not None:
            return self._shared_modules
        if "embed_tokens" in self._modules:  # a loaded checkpoint's copies (an EAGLE checkpoint may hold no LM head)
            return self._modules["embed_tokens"], self._modules.get("lm_head")
        name = type(self).__name__
        raise RuntimeError(
            f"This {name} is not attached to a target model, so it has no token embedding or LM head. "
            f"Call draft.attach(target) or load it with {name}.from_pretrained(path, target_model=target)."
        )

    def get_input_embeddings(self) -> nn.Module:
        return self._shared()[0]

    def get_output_embeddings(self) -> nn.Module | None:
        return self._shared()[1]

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the borrowed embedding and LM head (what an HF-layout checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(SHARED_WEIGHT_PREFIXES)}

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token ids `(...,)` → embeddings `(..., hidden)` in the draft's dtype (target embedding, frozen)."""
        embeddings = self.get_input_embeddings()(input_ids)
        if self.config.embedding_scale != 1.0:
            embeddings = embeddings * self.config.embedding_scale
        return embeddings.to(self.fc.weight.dtype)

    def lm_head_logits(self, states: torch.Tensor, draft_vocabulary: bool = False) -> torch.Tensor:
        """States `(..., hidden)` → logits `(..., vocab)` through the target's LM head, soft-capped when the config
        has `final_logit_softcapping`. With `draft_vocabulary=True` and a draft vocabulary set, only its tokens'
        logits: `(..., draft_vocab_size)`, in the order of `draft_vocab_ids`."""
        lm_head = self.get_output_embeddings()
        if lm_head is None:
            raise RuntimeError(
                f"This {type(self).__name__} holds no LM head of the target (its checkpoint stored none). Call "
                "draft.attach(target) to borrow the target's."
            )
        if draft_vocabulary and self.draft_vocab_ids is not None:
            weight = self.draft_vocabulary_rows(lm_head.weight)
            bias = None if getattr(lm_head, "bias", None) is None else self.draft_vocabulary_rows(lm_head.bias)
            logits = F.linear(states.to(weight.dtype), weight, bias)
        else:
            logits = lm_head(states.to(lm_head.weight.dtype))
        return self.soft_cap(logits)

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        """`cap · tanh(logits / cap)` with the config's `final_logit_softcapping` (unchanged when it is None)."""
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def scatter_to_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits `(..., draft_vocab_size)` → `(..., vocab_size)`, −inf outside the draft vocabulary
        (unchanged without one)."""
        if self.draft_vocab_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab_ids, logits)

    @property
    def d2t(self) -> torch.LongTensor:
        """EAGLE's draft-to-target offsets `(draft_vocab_size,)` int64: draft row i is target token `i + d2t[i]`
        (zeros `(vocab_size,)` without a draft vocabulary). Derived from `draft_vocab_ids`; read-only."""
        ids = self.draft_vocab_ids
        if ids is None:
            return torch.zeros(self.config.vocab_size, dtype=torch.long, device=self.fc.weight.device)
        return ids - torch.arange(ids.numel(), device=ids.device)

    @property
    def t2d(self) -> torch.BoolTensor:
        """EAGLE's target-to-draft mask `(vocab_size,)` bool: True for the tokens of the draft vocabulary (all without
        one). Derived from `draft_vocab_ids`; read-only."""
        ids = self.draft_vocab_ids
        if ids is None:
            return torch.ones(self.config.vocab_size, dtype=torch.bool, device=self.fc.weight.device)
        return torch.zeros(self.config.vocab_size, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)

    def set_draft_vocabulary(self, token_ids: Sequence[int] | torch.Tensor | None):
        """Restricts drafting to `token_ids`, or drafts over the whole vocabulary again with `None`.

        The LM head then computes `len(token_ids)` logits per drafted token instead of `vocab_size`. Tokens outside
        get draft probability 0; verification is unchanged, so decoding stays lossless. Saved with the draft
        (`config.draft_vocab_size` and the buffer `draft_vocab_ids`).
        """
        self._vocabulary_rows.clear()
        if token_ids is None:
            self.draft_vocab_ids = None
            self.config.draft_vocab_size = None
            return self
        with torch.inference_mode(False):
            ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted, without repeats
        vocab_size = self.config.vocab_size
        if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(
                f"A draft vocabulary needs at least one token id, all in [0, {vocab_size}); got {ids.numel()} ids "
                f"spanning [{ids.min().item() if ids.numel() else None}, {ids.max().item() if ids.numel() else None}]."
            )
        self.draft_vocab_ids = ids.to(self.fc.weight.device)
        self.config.draft_vocab_size = ids.numel()
        return self

    def train(self, mode: bool = True):
        """Sets training mode (as `nn.Module.train`) and drops the copied draft-vocabulary rows: between a switch
        to training and back, optimizer steps may have changed the weights in place without bumping tensor
        versions."""
        self._vocabulary_rows.clear()
        return super().train(mode)

    def draft_vocabulary_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight[draft_vocab_ids]`: the draft-vocabulary rows of a `(vocab, ...)` output weight or bias.

        Without gradients the copy is kept and reused until `weight` or the vocabulary changes (a new tensor, or
        an in-place update that bumps the tensor's version), or until `train()` / `eval()` is called, so drafting
        reads only these rows. After changing weights in place through `.data` or an optimizer, call `eval()`.
        """
        rows = self.draft_vocab_ids
        if rows is None:
            raise ValueError("This draft has no draft vocabulary; set one with draft.set_draft_vocabulary(token_ids).")
        if torch.is_grad_enabled():
            return weight[rows]
        stamp = (weight.data_ptr(), weight._version, weight.dtype, weight.device, rows.data_ptr(), rows._version)
        cached = self._vocabulary_rows.get(id(weight))
        if cached is None or cached[0] != stamp:
            cached = (stamp, weight.detach()[rows])
            self._vocabulary_rows[id(weight)] = cached
        return cached[1]

    def draft_vocabulary_index(self, token_ids: torch.LongTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Token ids `(...)` → their columns in draft-vocabulary logits `(...)` and whether they are in it `(...)`
        (the column of a token outside is meaningless). Without a draft vocabulary: the ids themselves, all True."""
        vocab_ids = self.draft_vocab_ids
        if vocab_ids is None:
            return token_ids, torch.ones_like(token_ids, dtype=torch.bool)
        index = torch.searchsorted(vocab_ids, token_ids).clamp(max=vocab_ids.numel() - 1)
        return index, vocab_ids[index] == token_ids

    @classmethod
    def load_draft_checkpoint(
        cls, path, *model_args, reference_layouts, allow_missing_weights: bool = False, **kwargs
    ) -> tuple[PreTrainedModel, dict]:
        """Loads a draft saved in our (transformers) layout or in another implementation's → `(model, loading_info)`.

        `reference_layouts` are pairs of functions `(is_reference(path, **kwargs), load_reference(cls, path,
        **kwargs))` of `dspark_hf.formats` modules, tried in order. A transformers checkpoint that lacks some of the
        draft's weights is refused with their names unless `allow_missing_weights`.
        """
        from ..targets import check_local_path

        check_local_path(path, "draft")
        kwargs.pop("output_loading_info", None)
        for is_reference, load_reference in reference_layouts:
            if is_reference(path, **kwargs):
                return load_reference(cls, path, **kwargs), {}
        model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing and not allow_missing_weights:
            raise ValueError(
                f"The draft checkpoint at {path} lacks weights {missing}: they would be randomly initialised. Check "
                "that it is the checkpoint of this draft configuration, or pass allow_missing_weights=True to "
                "initialise them."
            )
        return model, info

    def bind_loaded(self, target_model: PreTrainedModel | None, device_map=None):
        """After loading: attaches `target_model` if given and, unless a `device_map` was passed, first moves the
        draft to the target's device."""
        if target_model is not None:
            if device_map is None:
                self.to(target_model.device)
            self.attach(target_model)
        return self


__all__ = ["DraftKVCache", "SHARED_WEIGHT_PREFIXES", "TargetBoundDraftMixin"]
