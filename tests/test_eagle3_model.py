"""The EAGLE-3 draft on tiny random targets: config validation, shapes, the TTT forward against the autoregressive
chain, attention implementations and dtypes, binding to a target, draft vocabulary, checkpoints in both layouts, and
the loss."""

import copy
import json

import pytest
import torch
from conftest import make_gemma4_target, make_target
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from dspark_hf import Eagle3DraftConfig, Eagle3DraftModel, eagle3_loss
from dspark_hf.models.eagle3 import Eagle3Cache


@torch.no_grad()
def randomise(draft: Eagle3DraftModel, seed: int = 0) -> Eagle3DraftModel:
    """Non-trivial weights (norm scales 1 + 0.2·N(0,1), linears N(0, 1/fan_in)) so that mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in draft.named_parameters():
        if name.startswith(("embed_tokens.", "lm_head.")):
            continue
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(1 + 0.2 * noise if param.ndim == 1 else noise / param.shape[1] ** 0.5)
    return draft


def make_draft(family: str = "qwen3", layers: int = 1, seed: int = 0, target=None, **overrides):
    target = target if target is not None else make_target(family, num_layers=6)
    draft = Eagle3DraftModel.from_target(target, num_hidden_layers=layers, **overrides)
    return randomise(draft, seed).eval(), target


def features(draft: Eagle3DraftModel, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, draft.config.fused_feature_size, generator=generator)


def token_ids(draft: Eagle3DraftModel, batch: int, length: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, draft.config.vocab_size, (batch, length), generator=generator)


# -- configuration --------------------------------------------------------------------------------------------------

BAD_FIELDS = {
    "ttt_length": (0, r"Eagle3DraftConfig.ttt_length must be a positive integer"),
    "step_loss_decay": (0.0, r"step_loss_decay must be a finite number > 0"),
    "target_layer_ids": ([3, 1], r"target_layer_ids must be one or more distinct, increasing"),
    "num_target_layers": (2, r"target_layer_ids=\[1, 3\] reaches layer 3 but num_target_layers is 2"),
    "draft_architecture": ("mistral", r"draft_architecture must be one of \('qwen3', 'gemma4', 'llama'\)"),
    "attention_k_eq_v": (True, r"attention_k_eq_v=True needs draft_architecture='gemma4'"),
    "num_key_value_heads": (3, r"multiple of num_key_value_heads"),
    "draft_vocab_size": (1000, r"draft_vocab_size must be an integer in \[1, vocab_size=96\]"),
    "final_logit_softcapping": (-1.0, r"final_logit_softcapping must be > 0"),
    "use_draft_lm_head": ("yes", r"use_draft_lm_head must be True or False"),
}


@pytest.mark.parametrize("field", BAD_FIELDS)
def test_config_refuses_a_bad_value_naming_the_field(field):
    value, message = BAD_FIELDS[field]
    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4, target_layer_ids=[1, 3])
    Eagle3DraftConfig(**fields)  # the base is valid
    with pytest.raises(ValueError, match=message):
        Eagle3DraftConfig(**{**fields, field: value})


def test_config_defaults_and_auto_classes():
    config = Eagle3DraftConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               target_layer_ids=[0, 2, 4])
    assert (config.num_hidden_layers, config.ttt_length, config.step_loss_decay) == (1, 7, 0.8)
    assert config.fused_feature_size == 3 * 64 and config.head_dim == 16 and config.num_key_value_heads == 4
    auto = AutoConfig.for_model("eagle3", vocab_size=96, hidden_size=64, num_attention_heads=4)
    assert isinstance(auto, Eagle3DraftConfig)
    model = AutoModel.from_config(config)
    assert isinstance(model, Eagle3DraftModel)
    assert model.fc.weight.shape == (64, 192)
    assert model.layers[0].self_attn.q_proj.weight.shape == (64, 128)  # reads [embedding ; hidden]: 2d


# -- shapes and computation -----------------------------------------------------------------------------------------


def test_from_target_copies_the_geometry_and_borrows_embedding_and_head():
    target = make_target("llama", num_layers=6, hidden_size=64, vocab_size=96)
    draft = Eagle3DraftModel.from_target(target, ttt_length=3)
    config = draft.config
    assert (config.vocab_size, config.hidden_size, config.num_target_layers) == (96, 64, 6)
    assert config.draft_architecture == "qwen3" and config.num_hidden_layers == 1
    assert config.target_layer_ids[-1] <= 4  # never the final (normed) layer
    assert draft.is_attached_to(target)
    assert draft.get_output_embeddings() is target.get_output_embeddings()
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in draft.state_dict())
    with pytest.raises(ValueError, match="Unknown Eagle3DraftConfig field"):
        Eagle3DraftModel.from_target(target, block_size=4)


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_context_and_draft_steps_shapes_and_cache(family):
    target = make_gemma4_target() if family == "gemma4" else None
    draft, _ = make_draft(family, target=target)
    assert draft.config.draft_architecture == family
    ids, feats = token_ids(draft, 2, 5), features(draft, 2, 5)
    with torch.no_grad():
        out = draft.context_step(feats, ids, torch.arange(5).expand(2, 5))
        width = draft.config.hidden_size
        assert out.logits.shape == (2, 5, draft.config.vocab_size) and out.hidden_states.shape == (2, 5, width)
        assert isinstance(out.cache, Eagle3Cache) and out.cache.get_seq_length() == 5
        step = draft.draft_step(out.logits[:, -1:].argmax(-1), out.hidden_states[:, -1:], torch.full((2, 1), 5),
                                out.cache)
    assert step.logits.shape == (2, 1, draft.config.vocab_size) and out.cache.get_seq_length() == 6
    out.cache.crop(5)
    assert out.cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="exactly one of"):
        draft(ids, torch.arange(5).expand(2, 5))


def test_a_context_step_in_pieces_equals_one_over_everything():
    draft, _ = make_draft(layers=2)
    ids, feats, pos = token_ids(draft, 1, 7), features(draft, 1, 7), torch.arange(7)[None]
    with torch.no_grad():
        whole = draft.context_step(feats, ids, pos)
        first = draft.context_step(feats[:, :4], ids[:, :4], pos[:, :4])
        second = draft.context_step(feats[:, 4:], ids[:, 4:], pos[:, 4:], first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_ttt_step_k_equals_k_draft_steps_after_a_context(family, layers):
    """Training-time test at index q, step k == context over 0..q then k draft steps with the true tokens."""
    target = make_gemma4_target() if family == "gemma4" else None
    draft, _ = make_draft(family, layers=layers, target=target, ttt_length=3)
    length = 7
    ids, feats = token_ids(draft, 1, length), features(draft, 1, length)
    with torch.no_grad():
        ttt = draft.ttt_forward(ids, feats)
        for q in range(length - 3):
            out = draft.context_step(feats[:, : q + 1], ids[:, 1 : q + 2], torch.arange(q + 1)[None])
            hidden = out.hidden_states[:, -1:]
            torch.testing.assert_close(out.logits[0, -1], ttt.logits[0][0, q], atol=1e-4, rtol=0)
            for k in range(1, 3):
                step = draft.draft_step(ids[:, q + k + 1 : q + k + 2], hidden, torch.tensor([[q + k]]), out.cache)
                hidden = step.hidden_states
                torch.testing.assert_close(step.logits[0, 0], ttt.logits[k][0, q], atol=1e-4, rtol=0, msg=f"{q} {k}")


def test_ttt_rows_of_a_padded_sequence_equal_the_unpadded_sequence():
    draft, _ = make_draft(ttt_length=3)
    ids, feats = token_ids(draft, 2, 8), features(draft, 2, 8)
    ids[1, 6:], feats[1, 6:] = 0, 0
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        padded = draft.ttt_forward(ids, feats, mask)
        alone = draft.ttt_forward(ids[1:, :6], feats[1:, :6])
    for k in range(3):
        torch.testing.assert_close(padded.logits[k][1, : 6 - k], alone.logits[k][0, : 6 - k], atol=1e-5, rtol=0)
        assert torch.isfinite(padded.logits[k]).all()


def test_sdpa_and_eager_agree():
    draft, target = make_draft(layers=2, ttt_length=3)
    eager = Eagle3DraftModel.from_target(target, num_hidden_layers=2, ttt_length=3)
    eager.load_state_dict(draft.state_dict())
    draft.config._attn_implementation = "sdpa"
    eager.config._attn_implementation = "eager"
    ids, feats = token_ids(draft, 2, 6), features(draft, 2, 6)
    with torch.no_grad():
        a, b = draft.ttt_forward(ids, feats), eager.eval().ttt_forward(ids, feats)
    for k in range(3):
        torch.testing.assert_close(a.logits[k], b.logits[k], atol=1e-4, rtol=0)


def test_bf16_follows_fp32():
    draft, target = make_draft(ttt_length=2)
    ids, feats = token_ids(draft, 1, 6), features(draft, 1, 6)
    with torch.no_grad():
        full = draft.ttt_forward(ids, feats).logits
        half_target = make_target("qwen3", num_layers=6).to(torch.bfloat16)
        draft.to(torch.bfloat16).attach(half_target)
        half = draft.ttt_forward(ids, feats.to(torch.bfloat16)).logits
    for k in range(2):
        assert half[k].dtype == torch.bfloat16
        torch.testing.assert_close(half[k].float(), full[k], atol=0.15, rtol=0.05)


# -- binding to a target --------------------------------------------------------------------------------------------


def test_attach_refuses_a_target_that_does_not_match():
    draft, _ = make_draft()
    with pytest.raises(ValueError, match="vocab_size=96 but the target"):
        draft.attach(make_target("qwen3", num_layers=6, vocab_size=128))
    with pytest.raises(ValueError, match="hidden_size=64 but the target"):
        draft.attach(make_target("qwen3", num_layers=6, hidden_size=32))
    with pytest.raises(ValueError, match="num_target_layers=6"):
        draft.attach(make_target("qwen3", num_layers=4))
    last = copy.deepcopy(draft.config)
    last.target_layer_ids = [1, 5]  # valid for the config (the reference's trainer reads raw layer outputs) ...
    with pytest.raises(ValueError, match=r"need layer 5 but the target has 6 layers"):  # ... not for attach
        Eagle3DraftModel(last).attach(make_target("qwen3", num_layers=6))
    detached = Eagle3DraftModel(draft.config)
    assert not detached.is_attached
    with pytest.raises(RuntimeError, match="Eagle3DraftModel is not attached"):
        detached.compute_logits(torch.zeros(1, 1, 64))


# -- draft vocabulary, checkpoints ----------------------------------------------------------------------------------


def test_draft_vocabulary_restricts_the_logits():
    draft, _ = make_draft(ttt_length=2)
    ids, feats = token_ids(draft, 1, 5), features(draft, 1, 5)
    with torch.no_grad():
        full = draft.ttt_forward(ids, feats).logits
        draft.set_draft_vocabulary([7, 3, 50, 3])
        part = draft.ttt_forward(ids, feats).logits
        everything = draft.ttt_forward(ids, feats, draft_vocabulary=False).logits
    assert draft.config.draft_vocab_size == 3 and draft.draft_vocab_ids.tolist() == [3, 7, 50]
    torch.testing.assert_close(part[1], full[1][..., [3, 7, 50]], atol=1e-5, rtol=0)
    torch.testing.assert_close(everything[1], full[1])


@pytest.mark.parametrize("layout", ["hf", "deepspec"])
def test_save_and_load_round_trip(layout, tmp_path):
    draft, target = make_draft(layers=2, ttt_length=3)
    draft.set_draft_vocabulary(range(0, 96, 2))
    draft.save_pretrained(tmp_path, layout=layout)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("embed_tokens.weight" in names) == (layout == "deepspec") == ("lm_head.weight" in names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("eagle3" if layout == "hf" else "qwen3")
    loaded = Eagle3DraftModel.from_pretrained(tmp_path, target_model=target)
    assert loaded.is_attached_to(target) and loaded.config.draft_vocab_size == 48
    ids, feats = token_ids(draft, 1, 5), features(draft, 1, 5)
    with torch.no_grad():
        for a, b in zip(draft.ttt_forward(ids, feats).logits, loaded.ttt_forward(ids, feats).logits, strict=True):
            torch.testing.assert_close(a, b)


def test_an_hf_checkpoint_missing_weights_is_refused(tmp_path):
    draft, _ = make_draft()
    state = draft.own_state_dict()
    del state["fc.weight"]
    draft.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(ValueError, match=r"lacks weights \['fc.weight'\]"):
        Eagle3DraftModel.from_pretrained(tmp_path)
    assert Eagle3DraftModel.from_pretrained(tmp_path, allow_missing_weights=True).fc.weight.shape == draft.fc.weight.shape


def test_export_refuses_a_draft_the_reference_would_compute_differently(tmp_path):
    draft, _ = make_draft()
    draft.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="Qwen3Eagle3Model does not soft-cap"):
        draft.save_pretrained(tmp_path, layout="deepspec")
    gemma = make_draft("gemma4", target=make_gemma4_target())[0]
    gemma.config.attention_scale = None
    with pytest.raises(ValueError, match="Gemma4Eagle3Model uses attention scale 1.0"):
        gemma.save_pretrained(tmp_path, layout="deepspec")
    with pytest.raises(ValueError, match='layout must be "hf", "deepspec" or "eagle"'):
        draft.save_pretrained(tmp_path, layout="vllm")


# -- loss -----------------------------------------------------------------------------------------------------------


def test_loss_trains_the_draft_and_is_least_at_the_target():
    draft, target = make_draft(ttt_length=3)
    ids, feats = token_ids(draft, 2, 6), features(draft, 2, 6)
    target_logits = torch.randn(2, 6, 96)
    loss_mask = torch.ones(2, 6, dtype=torch.long)
    output = draft.ttt_forward(ids, feats)
    loss = eagle3_loss(output.logits, target_logits, loss_mask, step_loss_decay=0.5)
    loss.loss.backward()
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0
    assert torch.allclose(loss.step_weights, torch.tensor([1.0, 0.5, 0.25]))
    assert loss.position_mask[:, 0].sum(-1).tolist() == [5, 4, 3]  # step k needs token q+k+1 to exist
    # Draft logits equal to the target's next-token logits: every supervised row is a match.
    shifted = [torch.cat([target_logits[:, k + 1 :], torch.zeros(2, k + 1, 96)], 1) for k in range(3)]
    perfect = eagle3_loss(shifted, target_logits, loss_mask, step_loss_decay=0.5)
    assert torch.equal(perfect.accuracy[:, 0], perfect.accuracy[:, 1])
    torch.testing.assert_close(perfect.accept_rate[:, 0], perfect.accept_rate[:, 1])
    # 5 rows per sequence start a chain; row q is supervised for min(3, 5 - q) steps: (3+3+3+2+1)·2 + 10 rows.
    torch.testing.assert_close(perfect.tau_greedy, torch.tensor([34.0, 10.0]))
    assert (perfect.step_losses < loss.step_losses).all()  # soft cross-entropy is least at the target itself
