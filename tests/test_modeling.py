"""DSparkDraftConfig / DSparkDraftModel: shapes, checkpoints, Auto classes, targets, errors, attention semantics."""

import json

import pytest
import torch
from conftest import TARGET_FAMILIES, make_gemma4_target, make_target
from safetensors import safe_open
from transformers import AutoConfig, AutoModel

from dspark_hf import (
    DSparkDraftConfig,
    DSparkDraftModel,
    block_attention_mask,
    block_position_ids,
    default_target_layer_ids,
    select_target_features,
)

HEAD_TYPES = ["markov", "gated", "rnn", "none"]
VOCAB, HIDDEN, GAMMA = 96, 64, 4


def make_draft(target, head="markov", confidence=True, **overrides):
    torch.manual_seed(1)
    draft = DSparkDraftModel.from_target(
        target, block_size=GAMMA, markov_head_type=head, markov_rank=8, confidence_head=confidence,
        mask_token_id=VOCAB - 1, **overrides,
    )
    # Non-zero transition weights so that the sequential head really contributes in every comparison.
    if draft.markov_head is not None:
        torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.5)
    return draft.eval()


def context_features(target, input_ids, layer_ids):
    with torch.no_grad():
        out = target(input_ids, output_hidden_states=True)
    return select_target_features(out.hidden_states, layer_ids)


def block_inputs(input_ids, anchors, mask_id):
    """Blocks [x_p, mask, …] for each anchor p, concatenated: (batch, n·γ)."""
    blocks = torch.full((input_ids.shape[0], len(anchors) * GAMMA), mask_id)
    for i, p in enumerate(anchors):
        blocks[:, i * GAMMA] = input_ids[:, p]
    return blocks


def run_blocks(draft, features, input_ids, anchors):
    anchor_tensor = torch.tensor([anchors])
    seq_len = input_ids.shape[1]
    return draft(
        block_inputs(input_ids, anchors, draft.config.mask_token_id),
        block_position_ids(anchor_tensor, GAMMA),
        target_hidden_states=features,
        context_position_ids=torch.arange(seq_len).unsqueeze(0),
        attention_mask=block_attention_mask(anchor_tensor, GAMMA, seq_len),
    )


@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("confidence", [True, False])
def test_shapes_for_every_head(llama_target, head, confidence):
    draft = make_draft(llama_target, head, confidence)
    ids = torch.randint(0, VOCAB - 1, (2, 12))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    assert features.shape == (2, 12, HIDDEN * len(draft.config.target_layer_ids))
    out = run_blocks(draft, features, ids, [3, 7])
    assert out.logits.shape == (2, 2 * GAMMA, VOCAB)
    assert out.hidden_states.shape == (2, 2 * GAMMA, HIDDEN)
    hidden = out.hidden_states.view(2, 2, GAMMA, HIDDEN)
    prev = torch.randint(0, VOCAB, (2, 2, GAMMA))
    logits = draft.sequential_logits(out.logits.view(2, 2, GAMMA, VOCAB), hidden, prev)
    assert logits.shape == (2, 2, GAMMA, VOCAB)
    assert torch.equal(logits, out.logits.view(2, 2, GAMMA, VOCAB)) == (head == "none")
    confidence_logits = draft.confidence_logits(hidden, prev)
    assert (confidence_logits is None) == (not confidence)
    if confidence:
        assert confidence_logits.shape == (2, 2, GAMMA)


def test_block_mask_semantics(llama_target):
    """A block position's output ignores context at/after its anchor and every other block."""
    draft = make_draft(llama_target)
    ids = torch.randint(0, VOCAB - 1, (1, 16))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    reference = run_blocks(draft, features, ids, [4, 10]).logits
    changed = features.clone()
    changed[:, 4:] = torch.randn_like(changed[:, 4:])  # everything from the first anchor on
    changed_ids = ids.clone()
    changed_ids[:, 10] = (ids[:, 10] + 1) % (VOCAB - 1)  # the second block's anchor
    out = run_blocks(draft, changed, changed_ids, [4, 10]).logits
    torch.testing.assert_close(out[:, :GAMMA], reference[:, :GAMMA], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, GAMMA:], reference[:, GAMMA:])
    # Context strictly before the anchor does matter.
    earlier = features.clone()
    earlier[:, 3] += 1.0
    assert not torch.allclose(run_blocks(draft, earlier, ids, [4, 10]).logits[:, :GAMMA], reference[:, :GAMMA])


def test_blocks_in_one_pass_equal_one_block_with_cache(llama_target):
    """The training layout (many masked blocks) equals the generation layout (cached context, one block)."""
    draft = make_draft(llama_target, "rnn")
    ids = torch.randint(0, VOCAB - 1, (1, 20))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    anchors = [2, 9, 15]
    together = run_blocks(draft, features, ids, anchors).logits
    for i, p in enumerate(anchors):
        alone = draft(
            block_inputs(ids, [p], draft.config.mask_token_id),
            block_position_ids(torch.tensor([[p]]), GAMMA),
            target_hidden_states=features[:, :p],
            context_position_ids=torch.arange(p).unsqueeze(0),
        ).logits
        torch.testing.assert_close(together[:, i * GAMMA : (i + 1) * GAMMA], alone, rtol=1e-5, atol=1e-5)


def test_incremental_context_cache_matches_full_context(llama_target):
    draft = make_draft(llama_target)
    ids = torch.randint(0, VOCAB - 1, (1, 14))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    block = block_inputs(ids, [13], draft.config.mask_token_id)
    positions = block_position_ids(torch.tensor([[13]]), GAMMA)
    full = draft(block, positions, target_hidden_states=features[:, :13], context_position_ids=torch.arange(13)[None])
    cache = draft(block, positions, target_hidden_states=features[:, :6], context_position_ids=torch.arange(6)[None],
                  use_cache=True).cache
    draft.extend_context(cache, features[:, 6:13], torch.arange(6, 13)[None])
    assert cache.get_seq_length() == 13
    incremental = draft(block, positions, cache=cache)
    torch.testing.assert_close(incremental.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_agree(llama_target):
    draft = make_draft(llama_target)
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    draft.config._attn_implementation = "sdpa"
    sdpa = run_blocks(draft, features, ids, [3, 8]).logits
    draft.config._attn_implementation = "eager"
    eager = run_blocks(draft, features, ids, [3, 8]).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-4)


def test_bf16_forward(llama_target):
    target = llama_target.to(torch.bfloat16)
    draft = make_draft(target)
    assert draft.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB - 1, (1, 10))
    out = run_blocks(draft, context_features(target, ids, draft.config.target_layer_ids), ids, [4])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("layout", ["hf", "deepspec"])
def test_save_load_bit_exact(tmp_path, llama_target, head, layout):
    draft = make_draft(
        llama_target, head, calibration_temperatures=[1.0, 1.5, 2.0, 0.5], calibration_biases=[-1.0, 0.0, 0.5, 2.0]
    )
    draft.save_pretrained(tmp_path, layout=layout)
    assert not list(tmp_path.glob("*.bin")), "safetensors only"
    loaded = DSparkDraftModel.from_pretrained(tmp_path, target_model=llama_target).eval()
    assert loaded.config.markov_head_type == head
    assert loaded.config.calibration_temperatures == [1.0, 1.5, 2.0, 0.5]
    assert loaded.config.calibration_biases == [-1.0, 0.0, 0.5, 2.0]
    original_state, loaded_state = draft.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    assert torch.equal(run_blocks(draft, features, ids, [5]).logits, run_blocks(loaded, features, ids, [5]).logits)


@pytest.mark.parametrize("head", HEAD_TYPES)
def test_added_layers_start_as_identity_and_train(tmp_path, llama_target, head):
    draft = make_draft(llama_target, head)
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    before = run_blocks(draft, features, ids, [3, 7]).logits
    depth = draft.config.num_hidden_layers
    draft.add_layers(2)
    assert draft.config.num_hidden_layers == len(draft.layers) == depth + 2
    assert torch.equal(run_blocks(draft, features, ids, [3, 7]).logits, before)
    run_blocks(draft.train(), features, ids, [3, 7]).logits.logsumexp(-1).sum().backward()
    assert draft.layers[-1].self_attn.o_proj.weight.grad.abs().sum() > 0
    draft.save_pretrained(tmp_path)
    loaded = DSparkDraftModel.from_pretrained(tmp_path, target_model=llama_target)
    assert len(loaded.layers) == depth + 2
    with pytest.raises(ValueError, match="positive number of layers"):
        draft.add_layers(0)


@pytest.mark.parametrize("layout", ["hf", "deepspec"])
def test_draft_vocabulary_round_trips(tmp_path, llama_target, layout):
    draft = make_draft(llama_target).set_draft_vocabulary([40, 3, 7, 3, 0])  # kept sorted, without repeats
    assert draft.draft_vocab_ids.tolist() == [0, 3, 7, 40] and draft.config.draft_vocab_size == 4
    draft.save_pretrained(tmp_path / "restricted", layout=layout)
    loaded = DSparkDraftModel.from_pretrained(tmp_path / "restricted", target_model=llama_target)
    assert loaded.draft_vocab_ids.tolist() == [0, 3, 7, 40] and loaded.config.draft_vocab_size == 4
    assert "draft vocabulary: 4 of 96 tokens" in (tmp_path / "restricted" / "README.md").read_text()
    if layout == "deepspec":  # the reference state dict keeps only tensors vLLM/SGLang know; the ids go to config
        with safe_open(tmp_path / "restricted" / "model.safetensors", "pt") as f:
            assert "draft_vocab_ids" not in set(f.keys())
    loaded.set_draft_vocabulary(None).save_pretrained(tmp_path / "whole", layout=layout)
    reloaded = DSparkDraftModel.from_pretrained(tmp_path / "whole", target_model=llama_target)
    assert reloaded.draft_vocab_ids is None and reloaded.config.draft_vocab_size is None


@pytest.mark.parametrize("token_ids", [[], [3, VOCAB], [-1, 2]])
def test_bad_draft_vocabulary_raises_clear_error(llama_target, token_ids):
    with pytest.raises(ValueError, match=f"all in \\[0, {VOCAB}\\)"):
        make_draft(llama_target).set_draft_vocabulary(token_ids)


def test_draft_vocabulary_rows_follow_weight_updates(llama_target):
    draft = make_draft(llama_target).set_draft_vocabulary([1, 5, 9])
    weight = draft.markov_head.markov_w2.weight
    with torch.no_grad():
        rows = draft.draft_vocabulary_rows(weight)
        assert torch.equal(rows, weight[[1, 5, 9]]) and draft.draft_vocabulary_rows(weight) is rows  # cached
        weight.add_(1.0)  # an in-place update (an optimizer step) invalidates the copy
        assert torch.equal(draft.draft_vocabulary_rows(weight), weight[[1, 5, 9]])
        draft.set_draft_vocabulary([2, 5])
        assert torch.equal(draft.draft_vocabulary_rows(weight), weight[[2, 5]])
    assert draft.draft_vocabulary_rows(weight).requires_grad  # with gradients: a differentiable slice, not cached


def test_hf_layout_stores_no_target_weights(tmp_path, llama_target):
    make_draft(llama_target).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in keys)
    assert "fc.weight" in keys and "markov_head.markov_w1.weight" in keys


def test_a_checkpoint_missing_weights_is_refused_unless_allowed(tmp_path, llama_target):
    from safetensors.torch import load_file, save_file

    make_draft(llama_target, "markov").save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["confidence_head.proj.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights \['confidence_head.proj.bias'\]"):
        DSparkDraftModel.from_pretrained(tmp_path, target_model=llama_target)
    draft, info = DSparkDraftModel.from_pretrained(tmp_path, allow_missing_weights=True, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["confidence_head.proj.bias"] and draft.confidence_head is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DSparkDraftModel.from_pretrained(tmp_path / "no-such-draft")


def test_deepspec_layout_keys_and_config(tmp_path, llama_target):
    draft = make_draft(llama_target)
    draft.save_pretrained(tmp_path, layout="deepspec")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    for field, value in {
        "block_size": GAMMA, "target_layer_ids": draft.config.target_layer_ids, "mask_token_id": VOCAB - 1,
        "markov_rank": 8, "markov_head_type": "vanilla", "enable_confidence_head": True,
        "confidence_head_with_markov": True,
    }.items():
        assert config[field] == value, field
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("lm_head.weight"), llama_target.lm_head.weight)
    expected = {
        "embed_tokens.weight", "lm_head.weight", "fc.weight", "hidden_norm.weight", "norm.weight",
        "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
        "confidence_head.proj.weight", "confidence_head.proj.bias",
    }
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        expected.add(f"layers.0.self_attn.{name}.weight")
    for name in ("gate_proj", "up_proj", "down_proj"):
        expected.add(f"layers.0.mlp.{name}.weight")
    expected |= {"layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight"}
    assert expected <= keys


def test_deepspec_checkpoint_is_self_contained(tmp_path, llama_target):
    draft = make_draft(llama_target)
    draft.save_pretrained(tmp_path, layout="deepspec")
    standalone = DSparkDraftModel.from_pretrained(tmp_path).eval()
    assert standalone.is_attached
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    assert torch.equal(run_blocks(standalone, features, ids, [6]).logits, run_blocks(draft, features, ids, [6]).logits)
    # Re-exporting the standalone draft to our layout drops the copies again.
    standalone.save_pretrained(tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert not any(k.startswith(("embed_tokens", "lm_head")) for k in f.keys())


def test_auto_classes_round_trip(tmp_path, llama_target):
    draft = make_draft(llama_target)
    draft.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DSparkDraftConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, DSparkDraftModel)
    assert not loaded.is_attached
    loaded.attach(llama_target)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in draft.state_dict().items())


@pytest.mark.parametrize("family", sorted(TARGET_FAMILIES))
def test_from_target_every_family(family):
    target = make_target(family)
    draft = DSparkDraftModel.from_target(target, block_size=GAMMA, markov_rank=8)
    config = draft.config
    text = target.config.get_text_config()
    assert (config.vocab_size, config.hidden_size, config.num_target_layers) == (
        text.vocab_size, text.hidden_size, text.num_hidden_layers
    )
    assert config.head_dim == text.head_dim and config.num_key_value_heads == text.num_key_value_heads
    assert max(config.target_layer_ids) <= text.num_hidden_layers - 2
    assert 0 <= config.mask_token_id < text.vocab_size
    ids = torch.randint(0, VOCAB - 1, (1, 10))
    out = run_blocks(draft, context_features(target, ids, config.target_layer_ids), ids, [5])
    assert out.logits.shape == (1, GAMMA, VOCAB)


def test_default_layer_ids_spread_and_avoid_final_layer():
    assert default_target_layer_ids(30) == [1, 8, 14, 20, 27]
    assert default_target_layer_ids(4) == [1]
    assert default_target_layer_ids(2) == [0]
    for layers in range(2, 40):
        ids = default_target_layer_ids(layers)
        assert ids == sorted(set(ids)) and ids[-1] <= layers - 2


def test_mask_token_prefers_unused_special_token(llama_target):
    class FakeToken:
        def __init__(self, content):
            self.content, self.special = content, True

    class FakeTokenizer:
        mask_token_id = None
        bos_token_id, eos_token_id, pad_token_id, unk_token_id = 0, 1, None, None
        chat_template = "{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"
        added_tokens_decoder = {0: FakeToken("<s>"), 1: FakeToken("</s>"), 2: FakeToken("<|im_start|>"),
                                3: FakeToken("<|im_end|>"), 4: FakeToken("<file_sep>"), 5: FakeToken("<repo_name>")}

    draft = DSparkDraftModel.from_target(llama_target, tokenizer=FakeTokenizer())
    assert draft.config.mask_token_id == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"block_size": 0}, "block_size"),
        ({"markov_head_type": "lstm"}, "markov_head_type"),
        ({"markov_rank": 0}, "markov_rank"),
        ({"target_layer_ids": []}, "target_layer_ids"),
        ({"target_layer_ids": [2, 1]}, "increasing"),
        ({"target_layer_ids": [-2, 1]}, ">= -1"),
        ({"target_layer_ids": [3], "num_target_layers": 4}, "final norm"),
        ({"mask_token_id": 96}, "mask_token_id"),
        ({"calibration_temperatures": [1.0]}, "calibration_temperatures"),
        ({"calibration_temperatures": [1.0, 1.0, 0.0, 1.0]}, "> 0"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple"),
        ({"tv_loss_weight": -1.0}, "tv_loss_weight"),
        ({"loss_position_decay": 0.0}, "loss_position_decay"),
        ({"draft_vocab_size": 0}, "draft_vocab_size"),
        ({"draft_vocab_size": VOCAB + 1}, "draft_vocab_size"),
        ({"draft_architecture": "llama"}, "draft_architecture must be one of"),
        ({"attention_k_eq_v": True}, "attention_k_eq_v=True needs draft_architecture='gemma4'"),
        ({"use_double_wide_mlp": True}, "use_double_wide_mlp=True needs draft_architecture='gemma4'"),
        ({"attention_scale": 0.0}, "attention_scale"),
        ({"num_kv_shared_layers": -1}, "num_kv_shared_layers"),
    ],
)
def test_bad_config_raises_clear_error(overrides, message):
    fields = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": 4, "block_size": GAMMA,
              "mask_token_id": 5, **overrides}
    with pytest.raises(ValueError, match=message):
        DSparkDraftConfig(**fields)


def test_missing_mask_token_raises():
    with pytest.raises(ValueError, match="mask_token_id"):
        DSparkDraftModel(DSparkDraftConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4))


@pytest.mark.parametrize(
    "target_kwargs, message",
    [({"vocab_size": 128}, "vocab_size=96"), ({"hidden_size": 32}, "hidden_size=64"), ({"num_layers": 3}, "num_target_layers=4")],
)
def test_attach_mismatched_target_names_both_values(llama_target, target_kwargs, message):
    draft = make_draft(llama_target)
    other = make_target("llama", **target_kwargs)
    with pytest.raises(ValueError, match=message):
        draft.attach(other)


def test_attach_rejects_layer_ids_beyond_target(llama_target):
    config = DSparkDraftConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, mask_token_id=5,
                               target_layer_ids=[3])
    with pytest.raises(ValueError, match="target_layer_ids"):
        DSparkDraftModel(config).attach(llama_target)


def test_unknown_from_target_override(llama_target):
    with pytest.raises(ValueError, match="blocksize"):
        DSparkDraftModel.from_target(llama_target, blocksize=4)


def test_unattached_draft_raises_clear_error(tmp_path, llama_target):
    make_draft(llama_target).save_pretrained(tmp_path)
    draft = DSparkDraftModel.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="attach"):
        draft(torch.tensor([[1, 95, 95, 95]]), torch.arange(4)[None])


def test_save_rejects_unknown_layout(tmp_path, llama_target):
    with pytest.raises(ValueError, match="layout"):
        make_draft(llama_target).save_pretrained(tmp_path, layout="gguf")


@pytest.mark.parametrize("head", HEAD_TYPES)
def test_forward_with_prev_ids_runs_the_heads(llama_target, head):
    """With `prev_ids` the model's own forward is the training forward: block logits U_k + B_k and confidence
    logits of every position, equal to the heads applied to the backbone's states one by one."""
    draft = make_draft(llama_target, head)
    ids = torch.randint(0, VOCAB - 1, (2, 12))
    features = context_features(llama_target, ids, draft.config.target_layer_ids)
    anchors = [3, 7]
    prev_ids = torch.stack([ids[:, p : p + GAMMA] for p in anchors], dim=1)  # (2, 2, γ)
    backbone = run_blocks(draft, features, ids, anchors)
    anchor_tensor = torch.tensor([anchors])
    out = draft(
        block_inputs(ids, anchors, draft.config.mask_token_id),
        block_position_ids(anchor_tensor, GAMMA),
        target_hidden_states=features,
        context_position_ids=torch.arange(12).unsqueeze(0),
        attention_mask=block_attention_mask(anchor_tensor, GAMMA, 12),
        prev_ids=prev_ids,
    )
    hidden = backbone.hidden_states.view(2, 2, GAMMA, -1)
    assert out.logits.shape == (2, 2, GAMMA, VOCAB) and out.hidden_states.shape == hidden.shape
    expected = draft.sequential_logits(backbone.logits.view(2, 2, GAMMA, -1), hidden, prev_ids)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.confidence_logits, draft.confidence_logits(hidden, prev_ids))
    if head != "none":  # the sequential head changes the logits, so the comparison above is not vacuous
        assert not torch.allclose(out.logits, backbone.logits.view(2, 2, GAMMA, -1))


# ----------------------------------------------------------------------------------------------------------------------
# The Gemma 4 draft layer (draft_architecture="gemma4"; its numerics against the reference: test_reference_format.py)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma4_target():
    return make_gemma4_target("text", vocab_size=VOCAB)


@pytest.mark.parametrize("layout", ["hf", "deepspec"])
def test_gemma4_drafts_save_and_load_bit_exact(tmp_path, gemma4_target, layout):
    draft = make_draft(gemma4_target, "rnn", num_hidden_layers=2, calibration_temperatures=[1.0, 1.5, 2.0, 0.5])
    assert draft.config.draft_architecture == "gemma4" and draft.config.attention_k_eq_v
    draft.save_pretrained(tmp_path, layout=layout)
    loaded = DSparkDraftModel.from_pretrained(tmp_path, target_model=gemma4_target).eval()
    for name in ("draft_architecture", "head_dim", "num_key_value_heads", "attention_k_eq_v", "attention_scale",
                 "hidden_act", "rope_parameters", "final_logit_softcapping", "calibration_temperatures"):
        assert getattr(loaded.config, name) == getattr(draft.config, name), name
    original_state, loaded_state = draft.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys() and "layers.1.layer_scalar" in original_state
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    features = context_features(gemma4_target, ids, draft.config.target_layer_ids)
    assert torch.equal(run_blocks(draft, features, ids, [5]).logits, run_blocks(loaded, features, ids, [5]).logits)


@pytest.mark.parametrize(
    "layers, shared, double, widths",
    [
        (2, 1, True, [1, 2]),
        (3, 2, True, [1, 2, 2]),
        (2, 2, True, [1, 1]),  # the bound num_hidden_layers - num_kv_shared_layers must be > 0 (the reference's rule)
        (2, 20, True, [1, 1]),  # a 35-layer target's 20 kv-shared layers copied into a 2-layer draft
        (2, 0, True, [1, 1]),
        (3, 1, False, [1, 1, 1]),
    ],
)
def test_double_wide_mlps_follow_the_reference_rule(gemma4_target, layers, shared, double, widths):
    draft = make_draft(
        gemma4_target, num_hidden_layers=layers, num_kv_shared_layers=shared, use_double_wide_mlp=double
    )
    width = draft.config.intermediate_size
    assert [layer.mlp.gate_proj.out_features for layer in draft.layers] == [w * width for w in widths]


def test_gemma4_added_layers_start_as_identity_and_keep_their_widths(tmp_path, gemma4_target):
    draft = make_draft(gemma4_target, num_hidden_layers=2, num_kv_shared_layers=1, use_double_wide_mlp=True)
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    features = context_features(gemma4_target, ids, draft.config.target_layer_ids)
    before = run_blocks(draft, features, ids, [3, 7]).logits
    draft.add_layers(2)
    width = draft.config.intermediate_size
    assert [layer.mlp.gate_proj.out_features for layer in draft.layers] == [width, 2 * width, 2 * width, 2 * width]
    assert (draft.config.num_hidden_layers, draft.config.num_kv_shared_layers) == (4, 3)
    assert torch.equal(run_blocks(draft, features, ids, [3, 7]).logits, before)
    draft.save_pretrained(tmp_path)
    loaded = DSparkDraftModel.from_pretrained(tmp_path, target_model=gemma4_target)
    assert [layer.mlp.gate_proj.out_features for layer in loaded.layers] == [width, 2 * width, 2 * width, 2 * width]
