"""DSpark drafting on hybrid (linear-attention + full-attention) targets: tiny Qwen3.5- and Qwen3-Next-style models.

A verification pass advances the linear layers' recurrent state over every proposed token; after a rejection the
loop must restore the state of the last accepted token. transformers 5.25 keeps per-token states for that
(`Cache.activate_past_recording(recurrent_states_to_keep=...)`); 5.24 cannot, and must say so.
"""

import pytest
import torch
from conftest import HYBRID_FAMILIES, exact_two_token_distribution, make_draft, make_hybrid_target, tv_bound

import dspark_hf.compat as compat

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
