"""The reference (DeepSpec) checkpoint format against checkpoints and outputs written by the reference's own code.

Import: every fixture loads with `DSparkDraftModel.from_pretrained` and gives the reference's block logits and
confidence logits, in its training forward and in two decoding rounds. Export: a fixture saved again, and a fresh
draft built here, carry every config field the reference's loaders require and exactly the reference's weight names
and shapes.
"""

import json

import pytest
import torch
from reference_fixtures import ATOL, FIXTURES, HEADS, decoding_rounds, fixture_dir, load_io, training_forward
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dspark_hf import DSparkDraftModel

FAMILIES = ("qwen3",)
# Read by the reference's model constructors with an assert or without a guard (fixture README, section (a)).
REQUIRED_FIELDS = (
    "architectures",
    "target_layer_ids",
    "mask_token_id",
    "num_anchors",
    "enable_confidence_head",
    "markov_rank",
    "block_size",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "rms_norm_eps",
    "num_attention_heads",
    "num_key_value_heads",
    "attention_bias",
    "attention_dropout",
)
QWEN3_FIELDS = (
    "head_dim",
    "layer_types",
    "sliding_window",
    "intermediate_size",
    "hidden_act",
    "rope_parameters",
    "max_position_embeddings",
)
CASES = [(family, head) for family in FAMILIES for head in HEADS]


def case_id(case) -> str:
    return "_".join(case)


@pytest.fixture(scope="module")
def targets():
    return {family: AutoModelForCausalLM.from_pretrained(FIXTURES / "targets" / family) for family in FAMILIES}


def load_fixture_draft(family: str, head: str, target=None) -> DSparkDraftModel:
    return DSparkDraftModel.from_pretrained(fixture_dir(family, head), target_model=target, dtype=torch.float32)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_checkpoint_gives_the_reference_training_logits(case):
    family, head = case
    io = load_io(family, head)
    draft = load_fixture_draft(family, head)
    expected_head = {"dflash": "none", "none": "none", "vanilla": "markov"}.get(head, head)
    assert draft.config.markov_head_type == expected_head
    assert (draft.confidence_head is not None) == (head != "dflash")
    output = training_forward(draft, io)
    kept = io["train.block_keep_mask"]  # the reference's dummy blocks attend to nothing: their outputs mean nothing
    torch.testing.assert_close(output.logits[kept], io["train.draft_logits"][kept], atol=ATOL, rtol=0)
    if head == "dflash":
        assert output.confidence_logits is None
    else:
        torch.testing.assert_close(
            output.confidence_logits[kept], io["train.confidence_logits"][kept], atol=ATOL, rtol=0
        )
    if head != "dflash" and head != "none":  # the head moves the logits: the comparison covers it
        assert (io["train.draft_logits"] - io["train.base_logits"])[kept].abs().max() > 0.1


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_checkpoint_decodes_as_the_reference(case, targets):
    family, head = case
    io = load_io(family, head)
    draft = load_fixture_draft(family, head, target=targets[family])
    ours = decoding_rounds(draft, io)
    for key, value in ours.items():
        if key.endswith("greedy_tokens"):
            assert torch.equal(value, io[key]), key
        else:
            torch.testing.assert_close(value.float(), io[key].float(), atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_export_writes_what_the_reference_loads(case, targets, tmp_path):
    family, head = case
    source = fixture_dir(family, head)
    draft = load_fixture_draft(family, head, target=targets[family])
    draft.save_pretrained(tmp_path, layout="deepspec")
    theirs = json.loads((source / "config.json").read_text())
    ours = json.loads((tmp_path / "config.json").read_text())
    required = REQUIRED_FIELDS + (QWEN3_FIELDS if family == "qwen3" else ())
    if theirs["markov_rank"] > 0:
        required += ("markov_head_type",)
    if theirs["enable_confidence_head"]:
        required += ("confidence_head_with_markov",)
    assert [name for name in required if name not in ours] == []
    for name in required:
        if name != "rope_parameters":
            assert ours[name] == theirs[name], name
    assert ours["rope_parameters"]["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    # The same tensors under the same names: the reference's loader finds every weight it expects.
    expected, written = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value), key


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_draft_built_here_exports_the_reference_names_and_shapes(case, targets, tmp_path):
    family, head = case
    theirs = json.loads((fixture_dir(family, head) / "config.json").read_text())
    draft = DSparkDraftModel.from_target(
        targets[family],
        num_hidden_layers=theirs["num_hidden_layers"],
        intermediate_size=theirs["intermediate_size"],
        target_layer_ids=theirs["target_layer_ids"],
        mask_token_id=theirs["mask_token_id"],
        block_size=theirs["block_size"],
        markov_head_type={"dflash": "none", "vanilla": "markov"}.get(head, head),
        markov_rank=theirs["markov_rank"] or 16,
        confidence_head=theirs["enable_confidence_head"],
    )
    draft.save_pretrained(tmp_path, layout="deepspec")
    expected = load_file(str(fixture_dir(family, head) / "model.safetensors"))
    written = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    ours = json.loads((tmp_path / "config.json").read_text())
    for name in ("architectures", "markov_rank", "enable_confidence_head", "target_layer_ids", "block_size"):
        assert ours[name] == theirs[name], name
    assert ours.get("markov_head_type") == theirs.get("markov_head_type")
    assert ours["num_anchors"] > 0
