"""Reading the reference (DeepSpec) fixtures in `tests/fixtures/deepspec/` and running our draft on their inputs.

The fixtures were written by the reference's own code (`tests/fixtures/deepspec/make_fixtures.py`, README there);
nothing here needs the reference or the network.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from dspark_hf import DSparkDraftModel
from dspark_hf.speculative import sample_block

FIXTURES = Path(__file__).parent / "fixtures" / "deepspec"
HEADS = ("dflash", "none", "vanilla", "gated", "rnn")
# The reference's own reload check agrees to 3.4e-6 in float32 (README): this leaves room for summation order.
ATOL = 1e-4


def fixture_dir(family: str, head: str) -> Path:
    return FIXTURES / f"{family}_{head}"


def load_io(family: str, head: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir(family, head) / "io.safetensors"))


def training_forward(draft: DSparkDraftModel, io: dict[str, torch.Tensor]):
    """Our training forward on the fixture's blocks: the reference's anchors, mask, positions and previous tokens."""
    context_length = io["train.input_ids"].shape[1]
    positions = io["train.position_ids"]
    with torch.no_grad():
        return draft(
            input_ids=io["train.block_input_ids"],
            position_ids=positions[:, context_length:],
            target_hidden_states=io["train.target_hidden_states"],
            context_position_ids=positions[:, :context_length],
            attention_mask=io["train.attention_mask"].unsqueeze(1),
            prev_ids=io["train.prev_token_ids"],
        )


def decoding_rounds(draft: DSparkDraftModel, io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference evaluator's two greedy rounds (`decode.r1`, `decode.r2`) replayed with our context cache and
    block sampler; returns our tensors under the fixture's keys."""
    ours, cache = {}, None
    for round_name in ("r1", "r2"):
        key = f"decode.{round_name}."
        features = io[key + "context_hidden_states"]
        positions = io[key + "position_ids"]
        new_context = features.shape[1]
        with torch.no_grad():
            output = draft(
                input_ids=io[key + "block_input_ids"],
                position_ids=positions[:, new_context:],
                target_hidden_states=features,
                context_position_ids=positions[:, :new_context],
                cache=cache,
                use_cache=True,
                compute_logits=False,
            )
            cache = output.cache
            hidden = output.hidden_states
            base = draft.compute_logits(hidden).float()
            prev = io[key + "tf_prev_token_ids"]
            block = sample_block(draft, hidden, io[key + "block_input_ids"][:, 0])
        ours[key + "hidden_states"] = hidden
        ours[key + "base_logits"] = base
        ours[key + "tf_logits"] = draft.sequential_logits(base, hidden, prev)
        ours[key + "greedy_tokens"] = block.tokens
        ours[key + "greedy_logits"] = block.logits
        if draft.confidence_head is not None:
            ours[key + "tf_confidence_logits"] = draft.confidence_logits(hidden, prev)
            ours[key + "greedy_confidence_logits"] = block.confidence_logits
    return ours
