"""DSpark drafting on hybrid targets, whose layers are not all alike.

Linear-attention + full-attention targets (tiny Qwen3.5- and Qwen3-Next-style models): a verification pass advances
the linear layers' recurrent state over every proposed token; after a rejection the loop must restore the state of
the last accepted token. transformers 5.25 keeps per-token states for that
(`Cache.activate_past_recording(recurrent_states_to_keep=...)`); 5.24 cannot, and must say so.

Gemma 4 targets (sliding + full-attention layers of different head size and kv heads, read through
`per_layer_config` from transformers 5.24 on; text-only `Gemma4ForCausalLM` and the top-level multimodal
`Gemma4ForConditionalGeneration`, and one with per-layer inputs and kv-shared layers like the small released
models): the draft gets the reference's Gemma 4 layer, decodes losslessly, trains, and serves in the engine.
"""

import datasets
import pytest
import torch
from conftest import (
    HYBRID_FAMILIES,
    briefly_train,
    exact_two_token_distribution,
    make_draft,
    make_gemma4_target,
    make_hybrid_target,
    tv_bound,
)

import dspark_hf.compat as compat
from dspark_hf import DSparkDraftModel, select_target_features, target_hidden_state_indices
from dspark_hf.engine import DSparkEngine, SamplingParams
from dspark_hf.training import DSparkTrainer, DSparkTrainingArguments, run_target

ROLLBACK = compat.installed_transformers() >= compat.RECURRENT_ROLLBACK_TRANSFORMERS
VOCAB = 32


def new_draft(target, block_size=4):
    return make_draft(target, block_size=block_size)


@pytest.fixture(scope="module")
def hybrid_targets():
    return {family: make_hybrid_target(family, vocab_size=VOCAB) for family in HYBRID_FAMILIES}


def greedy_runs(target, draft, **kwargs):
    """(plain, speculative) greedy outputs for prompts whose tokens repeat, so prompt lookup proposes continuations
    that are partly accepted, and random drafted blocks that are mostly rejected whole."""
    pairs, accepted = [], []
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, VOCAB - 1, (1, 4), generator=generator).repeat(1, 3)
        reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
        out = target.generate(
            prompt, max_new_tokens=30, do_sample=False, assistant_model=draft, return_dict_in_generate=True, **kwargs
        )
        pairs.append((reference, out.sequences))
        accepted += out.speculation_stats.accepted
    return pairs, accepted


@pytest.mark.skipif(not ROLLBACK, reason=f"needs transformers>={compat.RECURRENT_ROLLBACK_TRANSFORMERS}")
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
@pytest.mark.parametrize("lookup", [None, 6])
def test_greedy_output_identical_on_hybrid_targets(hybrid_targets, family, lookup):
    target = hybrid_targets[family]
    draft = new_draft(target)
    pairs, accepted = greedy_runs(target, draft, prompt_lookup_num_tokens=lookup, lookup_min_probability=0.0)
    for reference, speculative in pairs:
        assert torch.equal(reference, speculative)
    assert 0 in accepted  # rounds that reject everything roll the recurrent state back to the anchor
    if lookup:
        assert max(accepted) > 0  # and partly accepted rounds to a token inside the proposal


@pytest.mark.skipif(not ROLLBACK, reason=f"needs transformers>={compat.RECURRENT_ROLLBACK_TRANSFORMERS}")
def test_one_recurrent_state_too_few_changes_the_output(hybrid_targets, monkeypatch):
    """Guards the test above: keeping only as many states as proposed tokens (not one more) is caught."""
    target = hybrid_targets["qwen3_5"]
    draft = new_draft(target)
    keep = compat.keep_rollback_states
    monkeypatch.setattr(compat, "keep_rollback_states", lambda cache, tokens: keep(cache, tokens - 1))
    pairs, _ = greedy_runs(target, draft)
    assert any(not torch.equal(reference, speculative) for reference, speculative in pairs)


@pytest.mark.skipif(not ROLLBACK, reason=f"needs transformers>={compat.RECURRENT_ROLLBACK_TRANSFORMERS}")
def test_sampling_on_a_hybrid_target_matches_its_distribution():
    """3k sampled generations on a Qwen3.5-style target: TV of (t2, t3) within the McDiarmid bound."""
    target = make_hybrid_target("qwen3_5", vocab_size=8, seed=3)
    torch.nn.init.normal_(target.lm_head.weight, std=0.15)  # a spread-out target distribution
    draft = new_draft(target, block_size=3)
    torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.5)
    prompt = torch.tensor([[1, 2, 3]])
    exact = exact_two_token_distribution(target, prompt)
    runs = 3_000
    counts = torch.zeros_like(exact)
    torch.manual_seed(0)
    for _ in range(runs):
        out = target.generate(prompt, max_new_tokens=4, do_sample=True, top_k=0, assistant_model=draft)
        counts[out[0, 4], out[0, 5]] += 1
    tv = 0.5 * (counts / runs - exact).abs().sum().item()
    assert tv < tv_bound(exact, runs), (tv, tv_bound(exact, runs))


@pytest.mark.skipif(ROLLBACK, reason="transformers can roll recurrent states back")
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_targets_name_the_transformers_release_they_need(hybrid_targets, family):
    target = hybrid_targets[family]
    with pytest.raises(ValueError, match=f"transformers>={compat.RECURRENT_ROLLBACK_TRANSFORMERS}"):
        target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, assistant_model=new_draft(target))


# ----------------------------------------------------------------------------------------------------------------------
# Gemma 4
# ----------------------------------------------------------------------------------------------------------------------

GEMMA4_CASES = {
    "text": {"kind": "text"},
    "multimodal": {"kind": "multimodal"},
    # Per-layer inputs and kv-shared last layers, as in the small released models; the draft reads a kv-shared layer.
    "kv_shared": {"kind": "text", "hidden_size_per_layer_input": 4, "num_kv_shared_layers": 2, "use_double_wide_mlp": True},
}
# The embedding output (-1), a full-attention layer and, in "kv_shared", a layer that reuses another's keys/values.
GEMMA4_LAYER_IDS = [-1, 1, 3]


def gemma4_target(case: str, **overrides):
    return make_gemma4_target(**{**GEMMA4_CASES[case], **overrides})


def language_model(target):
    return target.model.language_model if hasattr(target.model, "language_model") else target.model


@pytest.fixture(scope="module")
def gemma4_setups():
    """Per case: the target and a briefly distilled draft reading GEMMA4_LAYER_IDS."""
    setups = {}
    for case in GEMMA4_CASES:
        target = gemma4_target(case)
        draft = briefly_train(make_draft(target, target_layer_ids=GEMMA4_LAYER_IDS), target, steps=100, batch=32)
        setups[case] = target, draft
    return setups


@pytest.mark.parametrize("case", GEMMA4_CASES)
def test_a_gemma4_target_gets_the_reference_gemma4_draft_layer(case):
    target = gemma4_target(case)
    text = target.config.get_text_config()
    full = text.per_layer_config["full_attention"]  # where transformers >= 5.24 keeps global_head_dim
    draft = DSparkDraftModel.from_target(target, markov_rank=8, mask_token_id=31)
    config = draft.config
    assert config.draft_architecture == "gemma4"
    assert (config.head_dim, config.num_key_value_heads) == (full.head_dim, full.num_key_value_heads) == (32, 1)
    assert config.attention_k_eq_v and config.attention_scale == 1.0 and config.hidden_act == "gelu_pytorch_tanh"
    assert config.rope_parameters == text.rope_parameters["full_attention"]
    assert config.final_logit_softcapping == text.final_logit_softcapping == 10.0
    assert (config.num_kv_shared_layers, config.use_double_wide_mlp) == (
        text.num_kv_shared_layers, text.use_double_wide_mlp
    )
    layer = draft.layers[0]
    assert layer.self_attn.v_proj is None and "layer_scalar" in dict(layer.named_buffers())
    assert layer.self_attn.k_proj.out_features == 32
    # The target's embedding module applies √d itself: the draft's block input is the target's embedding output.
    ids = torch.randint(0, 31, (1, 6))
    with torch.no_grad():
        expected = language_model(target)(ids, output_hidden_states=True).hidden_states[0]
        assert torch.equal(draft.embed(ids), expected)


@pytest.mark.parametrize("case", GEMMA4_CASES)
def test_gemma4_target_features_are_the_language_models_hidden_states(case):
    """Training (run_target) and decoding (output_hidden_states= the needed indices, logits_to_keep=1) both read the
    language model's hidden states, also through the multimodal model and past kv-shared layers."""
    target = gemma4_target(case)
    ids = torch.randint(1, 31, (2, 9))
    with torch.no_grad():
        expected = language_model(target)(ids, output_hidden_states=True)
        features, last = run_target(target, ids, None, GEMMA4_LAYER_IDS)
        wanted = target_hidden_state_indices(GEMMA4_LAYER_IDS)
        decoding = target(ids, output_hidden_states=wanted, logits_to_keep=1).hidden_states
    assert torch.equal(features, select_target_features(expected.hidden_states, GEMMA4_LAYER_IDS))
    assert torch.equal(last, expected.last_hidden_state)
    assert torch.equal(select_target_features(decoding, GEMMA4_LAYER_IDS), features)


@pytest.mark.parametrize("case", GEMMA4_CASES)
@pytest.mark.parametrize("lookup", [None, 6])
def test_greedy_output_identical_on_gemma4_targets(gemma4_setups, case, lookup):
    target, draft = gemma4_setups[case]
    pairs, accepted = greedy_runs(target, draft, prompt_lookup_num_tokens=lookup, lookup_min_probability=0.0)
    for reference, speculative in pairs:
        assert torch.equal(reference, speculative)
    assert 0 in accepted and max(accepted) > 0  # rejected and (partly) accepted rounds both happen


def test_the_trainer_trains_a_draft_for_a_multimodal_gemma4_target(tmp_path):
    target = gemma4_target("multimodal")
    draft = make_draft(target, target_layer_ids=GEMMA4_LAYER_IDS)
    torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.5)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 31, (12,), generator=generator).tolist(), "loss_mask": [0] * 3 + [1] * 9}
            for _ in range(8)]
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    args = DSparkTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=5e-3, logging_steps=1, num_anchors=4,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=7, max_steps=3,
    )
    trainer = DSparkTrainer(model=draft, args=args, target_model=target, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    unchanged = [k for k, v in draft.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == ["layers.0.layer_scalar"]  # a buffer (1.0), as in the reference; everything else trained
    assert all(torch.equal(v, before_target[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("case", GEMMA4_CASES)
def test_the_engine_serves_gemma4_targets_losslessly(gemma4_setups, case):
    _, draft = gemma4_setups[case]
    target = gemma4_target(case, sliding_window=64)  # the same weights; the engine needs requests inside the window
    engine = DSparkEngine(target, draft, scheduler="full")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    requests = engine.generate(prompts, SamplingParams(max_new_tokens=16))
    for request, prompt in zip(requests, prompts, strict=True):
        plain = target.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        assert request.token_ids == plain[0, len(prompt):].tolist()
    assert engine.stats.tau > 1.0
