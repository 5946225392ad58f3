"""Lossless EAGLE-3 drafting: target.generate(assistant_model=eagle3_draft) and DSparkEngine(target, eagle3_draft)."""

import pytest
import torch
from conftest import exact_two_token_distribution, make_target, tv_bound
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.streamers import BaseStreamer

import dspark_hf.engine.engine as engine_module
import dspark_hf.speculative.eagle3_proposer as eagle3_proposer
from dspark_hf import DSparkEngine, Eagle3DraftModel, SamplingParams, eagle3_loss, speculative_decoding
from dspark_hf.scheduling import StaticThresholdPolicy
from dspark_hf.speculative.eagle3_proposer import Eagle3Proposer
from dspark_hf.speculative.sampling import RequestSamplingWarper

VOCAB = 32


def new_draft(target, layers: int = 1, ttt_length: int = 4, seed: int = 1, **overrides) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    return Eagle3DraftModel.from_target(target, num_hidden_layers=layers, ttt_length=ttt_length, **overrides).eval()


def distil(draft, target, steps: int = 150, batch: int = 16, prompt_len: int = 4, new_tokens: int = 28, seed: int = 0):
    """Trains `draft` on the target's own greedy continuations with its TTT forward and the EAGLE-3 loss, so that its
    proposals are often accepted (tests then see accepted, partially accepted and rejected rounds)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB - 1, (batch, prompt_len), generator=generator)
    with torch.no_grad():
        sequences = target.generate(prompts, max_new_tokens=new_tokens, do_sample=False,
                                    attention_mask=torch.ones_like(prompts))
        out = target(sequences, output_hidden_states=True)
    features = torch.cat([out.hidden_states[i + 1] for i in draft.config.target_layer_ids], dim=-1)
    optimizer = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    draft.train()
    for _ in range(steps):
        steps_out = draft.ttt_forward(sequences, features)
        loss = eagle3_loss(steps_out.logits, out.logits, loss_mask=torch.ones_like(sequences), step_loss_decay=0.8)
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
    return draft.eval()


@pytest.fixture(scope="module")
def drafts(targets):
    """Per family: an untrained one-layer draft (mostly rejected) and a distilled two-layer one (often accepted)."""
    return {
        (family, trained): distil(new_draft(target, layers=2), target) if trained else new_draft(target)
        for family, target in targets.items()
        for trained in (False, True)
    }


def generate_pair(target, draft, prompt, speculation: dict | None = None, **kwargs):
    """Plain greedy sequences, and the drafted call's sequences and `SpeculationStats`."""
    reference = target.generate(prompt, do_sample=False, **kwargs)
    out = target.generate(prompt, do_sample=False, assistant_model=draft, return_dict_in_generate=True,
                          **(speculation or {}), **kwargs)
    return reference, out.sequences, out.speculation_stats


# ----------------------------------------------------------------------------------------------------------------------
# generate(): greedy
# ----------------------------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["llama", "qwen3"]),
    trained=st.booleans(),
    gamma=st.integers(1, 8),
    threshold=st.sampled_from([None, 0.3]),
    prompt=st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=12),
    max_new_tokens=st.integers(1, 40),
    draft_vocabulary=st.sampled_from([None, list(range(0, VOCAB, 2))]),
)
def test_greedy_output_identical_to_plain_generate(
    targets, drafts, family, trained, gamma, threshold, prompt, max_new_tokens, draft_vocabulary
):
    target, draft = targets[family], drafts[(family, trained)]
    draft.set_draft_vocabulary(draft_vocabulary)
    policy = None if threshold is None else StaticThresholdPolicy(threshold)
    try:
        reference, speculative, stats = generate_pair(
            target, draft, torch.tensor([prompt]), {"max_draft_tokens": gamma, "verification_policy": policy},
            max_new_tokens=max_new_tokens,
        )
    finally:
        draft.set_draft_vocabulary(None)
    assert torch.equal(reference, speculative)
    generated = reference.shape[1] - len(prompt)
    assert sum(stats.accepted) + stats.num_rounds == generated - 1  # the prefill produced the first token
    assert all(p <= gamma for p in stats.proposed)
    assert stats.block_size == gamma


def test_distilled_drafts_are_accepted(targets, drafts):
    """Guards the property test: the distilled drafts' rounds are often accepted, γ = ttt_length by default."""
    for family, target in targets.items():
        accepted, rounds = 0, 0
        for seed in range(3):
            prompt = torch.randint(0, VOCAB - 1, (1, 5), generator=torch.Generator().manual_seed(seed))
            reference, speculative, stats = generate_pair(target, drafts[(family, True)], prompt, max_new_tokens=40)
            assert torch.equal(reference, speculative)
            assert set(stats.proposed) <= {0, 1, 2, 3, 4} and max(stats.proposed) == 4
            accepted, rounds = accepted + sum(stats.accepted), rounds + stats.num_rounds
        assert accepted / rounds > 0.4, (family, accepted / rounds)  # untrained: about 0.05


def test_confidences_are_the_drafts_probabilities_of_its_tokens(targets, drafts, monkeypatch):
    target, draft = targets["llama"], drafts[("llama", True)]
    blocks = []
    original = eagle3_proposer.eagle3_draft_chain

    def recording_chain(*args, **kwargs):
        blocks.append(original(*args, **kwargs))
        return blocks[-1]

    monkeypatch.setattr(eagle3_proposer, "eagle3_draft_chain", recording_chain)
    target.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert blocks
    for block in blocks:
        probs = torch.softmax(block.logits, dim=-1).gather(-1, block.tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(block.confidences, probs)  # greedy: no processors change the logits
        torch.testing.assert_close(torch.sigmoid(block.confidence_logits), block.confidences, atol=1e-5, rtol=0)
        assert torch.equal(block.tokens, block.logits.argmax(-1))


def test_eos_stopping_criteria_and_streamer(targets, drafts):
    target, draft = targets["qwen3"], drafts[("qwen3", True)]
    prompt = torch.tensor([[1, 2, 3, 4]])
    plain = target.generate(prompt, max_new_tokens=30, do_sample=False)
    eos = int(plain[0, prompt.shape[1] + 6])
    reference, speculative, _ = generate_pair(target, draft, prompt, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(reference, speculative)

    class Recorder(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Recorder()
    out = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=draft, streamer=streamer)
    assert streamer.ended and sum(streamer.chunks, []) == out[0].tolist()


def test_custom_generate_takes_an_eagle3_draft(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", True)]
    prompt = torch.tensor([[5, 6, 7]])
    out = target.generate(prompt, custom_generate=speculative_decoding, draft=draft, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, target.generate(prompt, max_new_tokens=16, do_sample=False))


def test_return_dict_with_scores(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", False)]
    prompt = torch.tensor([[5, 6, 7]])
    kwargs = {"max_new_tokens": 10, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    plain = target.generate(prompt, **kwargs)
    out = target.generate(prompt, assistant_model=draft, **kwargs)
    assert torch.equal(plain.sequences, out.sequences)
    assert len(out.scores) == 10
    for a, b in zip(plain.scores, out.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# generate(): sampling keeps the target's distribution
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_setup():
    """An 8-token target with a spread-out distribution and a γ = 3 EAGLE-3 draft that disagrees with it."""
    target = make_target("llama", vocab_size=8, hidden_size=32, num_layers=3, seed=3)
    torch.nn.init.normal_(target.lm_head.weight, std=0.15)
    draft = new_draft(target, layers=1, ttt_length=3, seed=2)
    torch.nn.init.normal_(draft.fc.weight, std=0.3)
    prompt = torch.tensor([[1, 2, 3]])
    return target, draft, prompt, exact_two_token_distribution(target, prompt)


def empirical_two_token_distribution(target, draft, prompt, runs):
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for _ in range(runs):
        out = target.generate(prompt, max_new_tokens=4, do_sample=True, top_k=0, assistant_model=draft)
        counts[out[0, prompt.shape[1] + 1], out[0, prompt.shape[1] + 2]] += 1
    return counts / runs


def test_sampling_matches_target_distribution(sampling_setup):
    """2.5k sampled generations: TV(empirical, exact) of (t2, t3), both from the first drafted round, stays within
    the McDiarmid bound for that sample size."""
    target, draft, prompt, exact = sampling_setup
    torch.manual_seed(0)
    runs = 2_500
    empirical = empirical_two_token_distribution(target, draft, prompt, runs=runs)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < tv_bound(exact, runs), (tv, tv_bound(exact, runs))


def test_biased_drafting_is_detected(sampling_setup, monkeypatch):
    """The same statistic exceeds the bound when drafted tokens are the argmax of the logits reported as their
    distribution."""
    target, draft, prompt, exact = sampling_setup
    original = eagle3_proposer.draw_draft_token

    def argmax_draw(logits, prefix_ids, drafted, logits_processor=None, do_sample=False):
        return original(logits, prefix_ids, drafted, logits_processor, do_sample=False)

    monkeypatch.setattr(eagle3_proposer, "draw_draft_token", argmax_draw)
    torch.manual_seed(0)
    empirical = empirical_two_token_distribution(target, draft, prompt, runs=2_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv > tv_bound(exact, 2_000), (tv, tv_bound(exact, 2_000))


# ----------------------------------------------------------------------------------------------------------------------
# generate(): refusals
# ----------------------------------------------------------------------------------------------------------------------


def test_batch_size_above_one_is_refused(targets, drafts):
    with pytest.raises(ValueError, match="batch size 2.*DSparkEngine"):
        targets["llama"].generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3,
                                  assistant_model=drafts[("llama", False)])


def test_beam_search_is_refused(targets, drafts):
    with pytest.raises(ValueError, match="Eagle3DraftModel assistant supports greedy decoding and sampling only"):
        targets["llama"].generate(torch.tensor([[1, 2]]), max_new_tokens=3, num_beams=2,
                                  assistant_model=drafts[("llama", False)])


def test_mismatched_draft_is_refused(targets):
    other = make_target("llama", vocab_size=VOCAB, hidden_size=32)
    with pytest.raises(ValueError, match="hidden_size"):
        targets["llama"].generate(torch.tensor([[1, 2]]), max_new_tokens=3, assistant_model=new_draft(other))


def test_prompt_lookup_is_refused(targets, drafts):
    with pytest.raises(ValueError, match="Prompt lookup.*not supported with an EAGLE-3 draft"):
        targets["llama"].generate(torch.tensor([[1, 2, 1]]), max_new_tokens=3, prompt_lookup_num_tokens=3,
                                  assistant_model=drafts[("llama", False)])


def test_a_zero_draft_length_is_refused(targets, drafts):
    with pytest.raises(ValueError, match="max_draft_tokens must be >= 1"):
        targets["llama"].generate(torch.tensor([[1, 2]]), max_new_tokens=3, max_draft_tokens=0,
                                  assistant_model=drafts[("llama", False)])


def test_the_proposer_is_chosen_by_the_drafts_type(targets, drafts, monkeypatch):
    made = []
    original = Eagle3Proposer.__init__
    monkeypatch.setattr(Eagle3Proposer, "__init__", lambda self, *a, **k: made.append(1) or original(self, *a, **k))
    targets["llama"].generate(torch.tensor([[1, 2]]), max_new_tokens=3, assistant_model=drafts[("llama", False)])
    assert made == [1]


# ----------------------------------------------------------------------------------------------------------------------
# DSparkEngine
# ----------------------------------------------------------------------------------------------------------------------

request_strategy = st.tuples(
    st.integers(0, 4),  # arrival round
    st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=10),  # prompt
    st.integers(1, 20),  # max_new_tokens
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["llama", "qwen3"]),
    trained=st.booleans(),
    gamma=st.sampled_from([None, 1, 6]),
    scheduler=st.sampled_from(["full", "threshold"]),
    mix=st.lists(request_strategy, min_size=1, max_size=5),
    compact_threshold=st.sampled_from([0.0, 0.5, 1.0]),
    max_batch_size=st.sampled_from([None, 2]),
)
def test_engine_greedy_requests_identical_to_plain_generate(
    targets, drafts, family, trained, gamma, scheduler, mix, compact_threshold, max_batch_size
):
    target = targets[family]
    kwargs = {"threshold": 0.3} if scheduler == "threshold" else {}
    engine = DSparkEngine(target, drafts[(family, trained)], scheduler=scheduler, max_draft_tokens=gamma,
                          compact_threshold=compact_threshold, max_batch_size=max_batch_size, **kwargs)
    requests, step = [None] * len(mix), 0
    while step <= max(m[0] for m in mix) or engine.has_unfinished():
        for i, (at, prompt, n) in enumerate(mix):
            if at == step:
                requests[i] = engine.add_request(prompt, SamplingParams(max_new_tokens=n))
        engine.step()
        step += 1
    for request, (_, prompt, n) in zip(requests, mix, strict=True):
        plain = target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
        assert request.token_ids == plain
        stats = request.stats
        assert sum(stats.accepted) + stats.num_rounds == len(request.token_ids) - 1
        assert all(p <= (gamma or 4) for p in stats.proposed)


def test_engine_draft_context_matches_single_request_generate(targets, drafts):
    """Batched, ragged and compacted, every request drafts what generate() drafts for it alone: its rounds keep
    the same numbers of tokens."""
    for family, target in targets.items():
        draft = drafts[(family, True)]
        prompts = [[1, 2, 3, 4, 5], [7, 8], [3, 9, 3, 9, 3, 9, 3, 9, 1], [20]]
        engine = DSparkEngine(target, draft, scheduler="full", compact_threshold=0.5)
        requests = engine.generate(prompts, SamplingParams(max_new_tokens=24))
        for prompt, request in zip(prompts, requests, strict=True):
            _, sequence, stats = generate_pair(target, draft, torch.tensor([prompt]), max_new_tokens=24)
            assert request.token_ids == sequence[0, len(prompt):].tolist()
            assert request.stats.accepted == stats.accepted, family
        assert sum(sum(r.stats.accepted) for r in requests) > 0


def test_engine_sampling_matches_target_distribution(sampling_setup):
    """4k copies of the prompt sampled in one batch: TV of (t2, t3) within the McDiarmid bound."""
    target, draft, prompt, exact = sampling_setup
    torch.manual_seed(0)
    runs = 4_000
    engine = DSparkEngine(target, draft, scheduler="full", max_batch_size=1_000)
    requests = engine.generate([prompt[0]] * runs, SamplingParams(max_new_tokens=4, do_sample=True))
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for request in requests:
        counts[request.token_ids[1], request.token_ids[2]] += 1
    tv = 0.5 * (counts / runs - exact).abs().sum().item()
    assert tv < tv_bound(exact, runs), (tv, tv_bound(exact, runs))


class ChainFaultWarper(RequestSamplingWarper):
    """Sampling settings whose draft-side use raises from the second draft step of any batch holding a request with
    max_new_tokens=17, after the chain appended keys to the draft's cache."""

    calls = 0

    def __init__(self, params, device):
        super().__init__(params, device)
        self.poisoned = any(p.max_new_tokens == 17 for p in params)

    def __call__(self, input_ids, scores):
        if self.poisoned:
            ChainFaultWarper.calls += 1
            if ChainFaultWarper.calls >= 2:
                raise RuntimeError("injected drafting fault")
        return super().__call__(input_ids, scores)


def test_engine_request_whose_draft_chain_fails_fails_alone(targets, drafts, monkeypatch):
    """A fault inside a round's draft chain: the poisoned request finishes with an error, the others (taken apart
    and merged again with their draft states) still equal plain generate."""
    monkeypatch.setattr(engine_module, "RequestSamplingWarper", ChainFaultWarper)
    monkeypatch.setattr(ChainFaultWarper, "calls", 0)
    target = targets["qwen3"]
    engine = DSparkEngine(target, drafts[("qwen3", True)], scheduler="full")
    healthy = [([1, 2, 3], 12), ([4, 5], 9), ([6], 14)]
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in healthy]
    poisoned = engine.add_request([7, 8], SamplingParams(max_new_tokens=17))
    while engine.has_unfinished():
        engine.step()
    assert poisoned.finish_reason == "error" and "injected drafting fault" in poisoned.error
    for request, (prompt, n) in zip(requests, healthy, strict=True):
        plain = target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
        assert request.finish_reason == "length" and request.token_ids == plain
