"""The reference (DeepSpec) checkpoint format against checkpoints and outputs written by the reference's own code.

Import: every fixture loads with `DSparkDraftModel.from_pretrained` and gives the reference's block logits and
confidence logits, in its training forward and in two decoding rounds. Export: a fixture saved again, and a fresh
draft built here, carry every config field the reference's loaders require and exactly the reference's weight names
and shapes.
"""

import json
import shutil

import pytest
import torch
from conftest import make_target
from reference_fixtures import ATOL, FIXTURES, HEADS, decoding_rounds, fixture_dir, load_io, training_forward
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dspark_hf import DSparkDraftModel

FAMILIES = ("qwen3", "gemma4")
# Read by the reference's model constructors with an assert or without a guard (fixture README, section (a)), or by
# its eval.py to pick the class (architectures[0], through the config class of model_type).
REQUIRED_FIELDS = (
    "architectures",
    "model_type",
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
GEMMA4_FIELDS = (
    "global_head_dim",
    "num_global_key_value_heads",
    "attention_k_eq_v",
    "intermediate_size",
    "hidden_activation",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
    "rope_parameters",
    "layer_types",
    "max_position_embeddings",
    "enable_moe_block",
    "hidden_size_per_layer_input",
    "final_logit_softcapping",
)
FAMILY_FIELDS = {"qwen3": QWEN3_FIELDS, "gemma4": GEMMA4_FIELDS}
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
    assert draft.config.draft_architecture == family
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
    required = REQUIRED_FIELDS + FAMILY_FIELDS[family]
    if theirs["markov_rank"] > 0:
        required += ("markov_head_type",)
    if theirs["enable_confidence_head"]:
        required += ("confidence_head_with_markov",)
    assert [name for name in required if name not in ours] == []
    for name in required:
        if name != "rope_parameters":
            assert ours[name] == theirs[name], name
    if family == "gemma4":  # the reference reads rope_parameters["full_attention"]
        assert ours["rope_parameters"]["full_attention"] == theirs["rope_parameters"]["full_attention"]
    else:
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
    geometry = {}
    if family == "gemma4":  # gemma4_dflash: the shared target's config with attention_k_eq_v flipped (fixture README)
        k_eq_v = theirs["attention_k_eq_v"]
        heads = theirs["num_global_key_value_heads" if k_eq_v else "num_key_value_heads"]
        geometry = {"attention_k_eq_v": k_eq_v, "num_key_value_heads": heads}
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
        **geometry,
    )
    assert draft.config.draft_architecture == family
    draft.save_pretrained(tmp_path, layout="deepspec")
    expected = load_file(str(fixture_dir(family, head) / "model.safetensors"))
    written = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    ours = json.loads((tmp_path / "config.json").read_text())
    names = ("architectures", "model_type", "markov_rank", "enable_confidence_head", "target_layer_ids", "block_size")
    if family == "gemma4":
        names += tuple(n for n in GEMMA4_FIELDS if n not in ("num_global_key_value_heads", "rope_parameters"))
        names += ("num_global_key_value_heads",) if theirs["attention_k_eq_v"] else ("num_key_value_heads",)
        assert ours["rope_parameters"]["full_attention"] == theirs["rope_parameters"]["full_attention"]
    for name in names:
        assert ours[name] == theirs[name], name
    assert ours.get("markov_head_type") == theirs.get("markov_head_type")
    assert ours["num_anchors"] > 0


def copy_fixture(family: str, head: str, tmp_path, **changes):
    """A copy of a reference fixture with config.json entries changed (a value of None deletes the entry)."""
    folder = tmp_path / f"{family}_{head}"
    shutil.copytree(fixture_dir(family, head), folder)
    config = json.loads((folder / "config.json").read_text())
    for name, value in changes.items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


UNREADABLE = {
    "another_family": ("qwen3", {"architectures": ["LlamaDSparkModel"]}, r"architectures\[0\]='LlamaDSparkModel'.*Gemma4DSparkModel"),
    "moe_block": ("gemma4", {"enable_moe_block": True}, r"enable_moe_block=True.*asserts enable_moe_block == False"),
    "per_layer_inputs": ("gemma4", {"hidden_size_per_layer_input": 256}, r"hidden_size_per_layer_input=256.*== 0"),
    "per_layer_inputs_missing": ("gemma4", {"hidden_size_per_layer_input": None}, r"no hidden_size_per_layer_input.*256"),
    "no_global_head_dim": ("gemma4", {"global_head_dim": None}, r"no global_head_dim"),
    "no_global_kv_heads": ("gemma4", {"num_global_key_value_heads": None}, r"no num_global_key_value_heads.*k_eq_v"),
    "flat_rope": ("gemma4", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, r"rope_parameters=.*full_attention"),
    "sliding_layer": ("gemma4", {"layer_types": ["sliding_attention", "full_attention"]}, r"layer_types=.*full_attention"),
    "qwen3_sliding": ("qwen3", {"layer_types": None, "use_sliding_window": True}, r"use_sliding_window=True"),
    "unknown_head": ("qwen3", {"markov_head_type": "lstm"}, r"markov_head_type='lstm'.*vanilla"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_a_reference_checkpoint_we_cannot_read_raises_a_clear_error(name, tmp_path):
    family, changes, message = UNREADABLE[name]
    folder = copy_fixture(family, "vanilla", tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        DSparkDraftModel.from_pretrained(folder)


@pytest.mark.parametrize("head", ["dflash", "rnn"])  # values from v_proj (its own kv heads) / values = keys
def test_a_gemma4_reference_config_resaved_by_transformers_still_imports(head, tmp_path):
    """transformers >= 5.24 moves global_head_dim and num_global_key_value_heads into per_layer_config when it saves
    a Gemma4TextConfig; the import reads them back from there."""
    from transformers import Gemma4TextConfig

    raw = json.loads((fixture_dir("gemma4", head) / "config.json").read_text())
    Gemma4TextConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}).save_pretrained(
        tmp_path
    )
    resaved = json.loads((tmp_path / "config.json").read_text())
    assert "global_head_dim" not in resaved and resaved["per_layer_config"]
    shutil.copy(fixture_dir("gemma4", head) / "model.safetensors", tmp_path)
    io = load_io("gemma4", head)
    output = training_forward(DSparkDraftModel.from_pretrained(tmp_path, dtype=torch.float32), io)
    kept = io["train.block_keep_mask"]
    torch.testing.assert_close(output.logits[kept], io["train.draft_logits"][kept], atol=ATOL, rtol=0)


def test_a_reimported_gemma4_export_keeps_the_references_target_fields(targets, tmp_path):
    """Fields describing the target (its sliding layers' head_dim and kv heads, sliding_window, ...) survive
    reference → ours (HF layout) → reference."""
    draft = load_fixture_draft("gemma4", "rnn", target=targets["gemma4"])
    draft.save_pretrained(tmp_path / "hf")
    DSparkDraftModel.from_pretrained(tmp_path / "hf", target_model=targets["gemma4"]).save_pretrained(
        tmp_path / "again", layout="deepspec"
    )
    theirs = json.loads((fixture_dir("gemma4", "rnn") / "config.json").read_text())
    ours = json.loads((tmp_path / "again" / "config.json").read_text())
    for name in ("head_dim", "num_key_value_heads", "sliding_window", "target_model_type", "rope_parameters"):
        assert ours[name] == theirs[name], name


def test_export_refuses_a_draft_the_reference_would_compute_differently(targets, tmp_path):
    gemma4 = DSparkDraftModel.from_target(targets["gemma4"], mask_token_id=4, markov_rank=8)
    gemma4.config.attention_scale = None  # head_dim ** -0.5: not the reference's Gemma 4 attention
    with pytest.raises(ValueError, match="attention scale 1.0"):
        gemma4.save_pretrained(tmp_path / "scale", layout="deepspec")
    qwen3 = DSparkDraftModel.from_target(targets["qwen3"], markov_rank=8, attention_scale=1.0)
    with pytest.raises(ValueError, match=r"head_dim\*\*-0.5"):
        qwen3.save_pretrained(tmp_path / "qwen3", layout="deepspec")
    # A Gemma 4 layer on a target whose embedding is not scaled: the reference would scale it by √d.
    llama = make_target("llama", hidden_size=64)
    unscaled = DSparkDraftModel.from_target(llama, draft_architecture="gemma4", markov_rank=8)
    with pytest.raises(ValueError, match=r"sqrt\(hidden_size\)=8"):
        unscaled.save_pretrained(tmp_path / "embedding", layout="deepspec")
