"""The trained default draft for SmolLM2-135M-Instruct that ships inside the package (bf16 safetensors, calibrated;
its model card is `README.md` in this folder)."""

from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..models.dspark import DSparkDraftModel

__all__ = ["DEFAULT_DRAFT_DIR", "load_default_draft"]

DEFAULT_DRAFT_DIR = Path(__file__).parent


def load_default_draft(target: PreTrainedModel, tokenizer=None) -> tuple[DSparkDraftModel, str]:
    """The shipped default draft attached to `target` (SmolLM2-135M-Instruct) in its dtype, or a fresh, untrained
    draft when the package ships none; returns `(draft, description)`."""
    if (DEFAULT_DRAFT_DIR / "config.json").exists():
        draft = DSparkDraftModel.from_pretrained(DEFAULT_DRAFT_DIR, target_model=target, dtype=target.dtype)
        return draft.eval(), f"built-in draft {DEFAULT_DRAFT_DIR.name}"
    torch.manual_seed(0)
    draft = DSparkDraftModel.from_target(target, tokenizer=tokenizer, block_size=8).eval()
    return draft, "a fresh, untrained draft (no trained default draft ships yet: expect τ ≈ 1 and no speed-up)"
