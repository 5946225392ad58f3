"""The reference (DeepSpec) EAGLE-3 checkpoint layout against checkpoints and outputs written by the reference's own
code (`tests/fixtures/deepspec_eagle3/`, README there).

Import: every fixture loads with `Eagle3DraftModel.from_pretrained` and gives the reference's training-time-test
logits of every step, its loss and metrics, and (three variants) its evaluator's greedy decoding. Export: a fixture
saved again carries every field of the reference's config and exactly its tensors; a draft built here has the
reference's weight names and shapes.
"""

import json
import shutil

import pytest
import torch
from reference_fixtures import ATOL, FIXTURES
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dspark_hf import Eagle3DraftModel
from dspark_hf.models.eagle3 import ttt_attention_mask
from dspark_hf.training.eagle3_losses import eagle3_loss

EAGLE3_FIXTURES = FIXTURES.parent / "deepspec_eagle3"
VARIANTS = ("qwen3", "qwen3_2layers", "gemma4", "gemma4_vproj")
DECODABLE = ("qwen3", "gemma4", "gemma4_vproj")  # the evaluator requires one draft layer
FAMILY = {"qwen3": "qwen3", "qwen3_2layers": "qwen3", "gemma4": "gemma4", "gemma4_vproj": "gemma4"}
# Asserted by the reference's model constructors, read by its evaluator, or read without a guard (README (a)).
REQUIRED_FIELDS = (
    "architectures",
    "model_type",
    "target_layer_ids",
    "ttt_length",
    "step_loss_decay",
    "draft_num_hidden_layers",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "attention_bias",
    "attention_dropout",
    "rms_norm_eps",
    "intermediate_size",
    "rope_parameters",
    "max_position_embeddings",
    "layer_types",
)
FAMILY_FIELDS = {
    "qwen3": ("head_dim", "hidden_act"),
    "gemma4": (
        "global_head_dim",
        "num_global_key_value_heads",
        "attention_k_eq_v",
        "hidden_activation",
        "num_kv_shared_layers",
        "use_double_wide_mlp",
        "enable_moe_block",
        "hidden_size_per_layer_input",
        "final_logit_softcapping",
    ),
}


def fixture(variant: str):
    return EAGLE3_FIXTURES / variant


def load_io(variant: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixture(variant) / "io.safetensors"))


def load_draft(variant: str, **kwargs) -> Eagle3DraftModel:
    return Eagle3DraftModel.from_pretrained(fixture(variant), dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def targets():
    return {family: AutoModelForCausalLM.from_pretrained(FIXTURES / "targets" / family) for family in ("qwen3", "gemma4")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_checkpoint_loads_as_its_family(variant):
    draft = load_draft(variant)
    theirs = json.loads((fixture(variant) / "config.json").read_text())
    assert draft.config.draft_architecture == FAMILY[variant]
    assert draft.config.num_hidden_layers == theirs["num_hidden_layers"] == len(draft.layers)
    assert draft.config.target_layer_ids == theirs["target_layer_ids"]
    assert (draft.config.ttt_length, draft.config.step_loss_decay) == (theirs["ttt_length"], theirs["step_loss_decay"])
    assert draft.is_attached and not draft.training
    if FAMILY[variant] == "gemma4":
        assert draft.config.attention_scale == 1.0 and draft.config.final_logit_softcapping == 10.0
        assert draft.config.attention_k_eq_v == theirs["attention_k_eq_v"]
        assert (draft.layers[0].self_attn.v_proj is None) == theirs["attention_k_eq_v"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ttt_forward_gives_the_reference_logits_of_every_step(variant):
    io = load_io(variant)
    draft = load_draft(variant)
    steps = io["train.steps.draft_logits"].shape[0]
    with torch.no_grad():
        output = draft.ttt_forward(io["train.input_ids"], io["train.target_hidden_states"], io["train.attention_mask"])
    assert len(output.logits) == steps == draft.config.ttt_length
    valid = io["train.steps.valid_query"]  # rows past a sequence's end attend nothing in the reference
    for k in range(steps):
        torch.testing.assert_close(output.hidden_states[k][valid[k]], io["train.steps.hidden_states"][k][valid[k]],
                                   atol=ATOL, rtol=0, msg=f"hidden step {k}")
        torch.testing.assert_close(output.logits[k][valid[k]], io["train.steps.draft_logits"][k][valid[k]],
                                   atol=ATOL, rtol=0, msg=f"logits step {k}")
        # The mask, materialised from the reference's flex mask_mod, on the rows it defines.
        ours = ttt_attention_mask(k, io["train.input_ids"].shape[1], io["train.attention_mask"].bool())[:, 0]
        assert torch.equal(ours[valid[k]], io[f"train.steps.attention_mask.{k}"][valid[k]])
    # Later steps really depend on the earlier ones (a step-0-only model would not match them).
    assert (io["train.steps.draft_logits"][1] - io["train.steps.draft_logits"][0])[valid[1]].abs().max() > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_metrics_are_the_references(variant):
    io = load_io(variant)
    draft = load_draft(variant)
    with torch.no_grad():
        target_logits = draft.lm_head_logits(io["train.target_last_hidden_states"])
        torch.testing.assert_close(target_logits, io["train.target_logits"], atol=ATOL, rtol=0)
        steps = draft.ttt_forward(io["train.input_ids"], io["train.target_hidden_states"], io["train.attention_mask"])
    loss = eagle3_loss(
        steps.logits, target_logits, io["train.loss_mask"], io["train.attention_mask"], draft.config.step_loss_decay
    )
    assert torch.equal(loss.position_mask, io["train.loss.position_mask"])
    torch.testing.assert_close(loss.step_weights, io["train.loss.step_weight"])
    torch.testing.assert_close(loss.row_losses, io["train.loss.row_loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss.step_losses, io["train.loss.step_loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss.loss.reshape(1), io["train.loss.total"], atol=ATOL, rtol=0)
    for name in ("accuracy", "accept_rate", "tau_greedy", "tau_probabilistic"):
        torch.testing.assert_close(getattr(loss, name), io[f"train.metrics.{name}"], atol=ATOL, rtol=0, msg=name)


def replay_decoding(draft: Eagle3DraftModel, io: dict[str, torch.Tensor]) -> list[int]:
    """The reference evaluator's greedy rounds with our context and draft steps, compared tensor by tensor; returns
    the output sequence they produce (prompt, first token, committed tokens)."""
    steps = io["decode.r1.draft_logits"].shape[1]
    with torch.no_grad():
        init = draft.context_step(io["decode.init.target_features"], io["decode.init.input_ids"],
                                  io["decode.init.position_ids"])
    torch.testing.assert_close(init.hidden_states, io["decode.init.hidden_states"], atol=ATOL, rtol=0)
    torch.testing.assert_close(init.logits, io["decode.init.logits"], atol=ATOL, rtol=0)
    cache, hidden = init.cache, init.hidden_states[:, -1:]
    sequence = io["decode.prompt_ids"][0].tolist() + io["decode.init.first_token"][0].tolist()
    for r in (1, 2, 3):
        key = f"decode.r{r}."
        start = int(io[key + "start"])
        assert cache.get_seq_length() == int(io[key + "cache_len_before"]) == start
        torch.testing.assert_close(hidden, io[key + "draft_hidden_in"], atol=ATOL, rtol=0)
        logits, tokens, outputs = [], [], []
        with torch.no_grad():
            for j in range(steps):
                logits.append(draft.compute_logits(hidden))
                tokens.append(logits[-1].argmax(-1))
                hidden = draft.draft_step(tokens[-1], hidden, torch.tensor([[start + j]]), cache).hidden_states
                outputs.append(hidden)
        torch.testing.assert_close(torch.cat(logits, 1), io[key + "draft_logits"], atol=ATOL, rtol=0)
        assert torch.equal(torch.cat(tokens, 1), io[key + "verify_input_ids"][:, 1:])
        assert torch.equal(io[key + "step_position_ids"], start + torch.arange(steps)[None])
        torch.testing.assert_close(torch.cat(outputs, 1), io[key + "step_hidden_states"], atol=ATOL, rtol=0)
        assert cache.get_seq_length() == start + steps
        if r == 3:
            break
        accepted = int(io[key + "accepted"])
        committed = torch.cat([torch.cat(tokens, 1)[:, :accepted], io[key + "target_greedy_tokens"][:, accepted:][:, :1]], 1)
        assert torch.equal(committed, io[key + "committed_tokens"])
        sequence += committed[0].tolist()
        cache.crop(start)
        with torch.no_grad():
            update = draft.context_step(io[key + "update_hidden_in"], committed, start + torch.arange(accepted + 1)[None],
                                        cache)
        # Only the last row is used; the reference computes the others bidirectionally (README (c)), we causally.
        torch.testing.assert_close(update.hidden_states[:, -1], io[key + "update_hidden_states"][:, -1], atol=ATOL,
                                   rtol=0)
        hidden = update.hidden_states[:, -1:]
    return sequence


@pytest.mark.parametrize("variant", DECODABLE)
def test_greedy_decoding_is_the_evaluators(variant):
    io = load_io(variant)
    assert replay_decoding(load_draft(variant), io) == io["decode.output_ids"][0].tolist()


@pytest.mark.parametrize("variant", DECODABLE)
def test_greedy_decoding_with_sdpa_and_a_target_attached(variant, targets):
    """sdpa attention and the target's own embedding / LM head modules give the same rounds (the fixtures' tiny
    targets are the ones the draft copies came from)."""
    io = load_io(variant)
    draft = load_draft(variant, attn_implementation="sdpa")
    draft.config.target_layer_ids = [0, 1, 2, 3]  # attach refuses the last layer; the fc width is unchanged below
    draft.attach(targets[FAMILY[variant]])
    draft.config.target_layer_ids = [0, 1, 2, 3, 4]
    assert "embed_tokens" not in draft._modules
    assert replay_decoding(draft, io) == io["decode.output_ids"][0].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_writes_the_references_config_and_tensors(variant, tmp_path):
    draft = load_draft(variant)
    draft.save_pretrained(tmp_path, layout="deepspec")
    theirs = json.loads((fixture(variant) / "config.json").read_text())
    ours = json.loads((tmp_path / "config.json").read_text())
    required = REQUIRED_FIELDS + FAMILY_FIELDS[FAMILY[variant]]
    assert [name for name in required if name not in ours] == []
    # Every field of the reference's config comes back with its value (the target fields are passed through).
    differing = {k: (ours.get(k), v) for k, v in theirs.items() if k != "transformers_version" and ours.get(k) != v}
    assert differing == {}
    expected, written = load_file(str(fixture(variant) / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value), key
    again = Eagle3DraftModel.from_pretrained(tmp_path)
    assert again.config.to_diff_dict() == draft.config.to_diff_dict()


@pytest.mark.parametrize("variant", ["qwen3", "gemma4", "gemma4_vproj"])
def test_a_draft_built_here_exports_the_reference_names_and_shapes(variant, targets, tmp_path):
    theirs = json.loads((fixture(variant) / "config.json").read_text())
    geometry = {}
    if FAMILY[variant] == "gemma4":
        k_eq_v = theirs["attention_k_eq_v"]
        heads = theirs["num_global_key_value_heads" if k_eq_v else "num_key_value_heads"]
        geometry = {"attention_k_eq_v": k_eq_v, "num_key_value_heads": heads}
    # Our attach refuses the target's last layer (transformers returns it final-normed): one feature less than theirs.
    draft = Eagle3DraftModel.from_target(
        targets[FAMILY[variant]], target_layer_ids=[0, 1, 2, 3], ttt_length=theirs["ttt_length"], **geometry
    )
    assert draft.config.draft_architecture == FAMILY[variant]
    draft.save_pretrained(tmp_path, layout="deepspec")
    expected = {k: tuple(v.shape) for k, v in load_file(str(fixture(variant) / "model.safetensors")).items()}
    expected["fc.weight"] = (theirs["hidden_size"], 4 * theirs["hidden_size"])
    written = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    assert written == expected
    ours = json.loads((tmp_path / "config.json").read_text())
    skipped = {"target_layer_ids"}
    if FAMILY[variant] == "gemma4":  # the kv-head count of the branch the draft does not use describes the target
        skipped.add("num_key_value_heads" if theirs["attention_k_eq_v"] else "num_global_key_value_heads")
        skipped.add("rope_parameters")  # it reads only the full-attention entry (the others carry a quirk, README)
        assert ours["rope_parameters"]["full_attention"] == theirs["rope_parameters"]["full_attention"]
    for name in REQUIRED_FIELDS + FAMILY_FIELDS[FAMILY[variant]]:
        if name not in skipped:
            assert ours[name] == theirs[name], name


def copy_fixture(variant: str, tmp_path, **changes):
    """A copy of a fixture with config.json entries changed (None deletes the entry)."""
    folder = tmp_path / variant
    shutil.copytree(fixture(variant), folder)
    config = json.loads((folder / "config.json").read_text())
    for name, value in changes.items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


UNREADABLE = {
    "another_class": ("qwen3", {"architectures": ["LlamaEagle3Model"]}, r"architectures\[0\]='LlamaEagle3Model'"),
    "no_ttt_length": ("qwen3", {"ttt_length": None}, r"no ttt_length.*requires it"),
    "no_step_loss_decay": ("gemma4", {"step_loss_decay": None}, r"no step_loss_decay"),
    "no_target_layer_ids": ("qwen3", {"target_layer_ids": None}, r"no target_layer_ids"),
    "draft_layers_differ": ("qwen3", {"draft_num_hidden_layers": 2}, r"draft_num_hidden_layers=2.*num_hidden_layers=1"),
    "sliding_layer": ("qwen3", {"layer_types": ["sliding_attention"]}, r"layer_types=.*full_attention"),
    "moe_block": ("gemma4", {"enable_moe_block": True}, r"enable_moe_block=True.*Gemma4Eagle3Model asserts"),
    "no_global_head_dim": ("gemma4", {"global_head_dim": None}, r"EAGLE-3 checkpoint has no global_head_dim"),
    "flat_rope": ("gemma4", {"rope_parameters": {"rope_type": "default"}}, r"rope_parameters=.*full_attention"),
    "bad_decay": ("qwen3", {"step_loss_decay": -1.0}, r"step_loss_decay must be a finite number > 0"),
    "layer_out_of_range": ("qwen3", {"num_target_layers": 4}, r"target_layer_ids=\[0, 1, 2, 3, 4\].*<= 3"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_a_reference_checkpoint_we_cannot_read_raises_a_clear_error(name, tmp_path):
    variant, changes, message = UNREADABLE[name]
    folder = copy_fixture(variant, tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        Eagle3DraftModel.from_pretrained(folder)


def test_a_reference_checkpoint_with_missing_weights_is_refused_by_name(tmp_path):
    folder = copy_fixture("qwen3", tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["layers.0.hidden_norm.weight"]
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['layers.0.hidden_norm.weight'\]"):
        Eagle3DraftModel.from_pretrained(folder)


def test_the_eagle3_draft_model_architecture_is_read_as_qwen3(tmp_path):
    """The reference's eval.py loads `architectures: ["Eagle3DraftModel"]` with its Qwen3 class."""
    draft = Eagle3DraftModel.from_pretrained(copy_fixture("qwen3", tmp_path, architectures=["Eagle3DraftModel"]))
    assert draft.config.draft_architecture == "qwen3"
    io = load_io("qwen3")
    with torch.no_grad():
        output = draft.ttt_forward(io["train.input_ids"], io["train.target_hidden_states"], io["train.attention_mask"])
    valid = io["train.steps.valid_query"][0]
    torch.testing.assert_close(output.logits[0][valid], io["train.steps.draft_logits"][0][valid], atol=ATOL, rtol=0)
