"""Lossless DSpark drafting inside target.generate(assistant_model=draft)."""

import copy

import pytest
import torch
from conftest import (
    briefly_train,
    exact_two_token_distribution,
    make_draft,
    make_sampling_setup,
    make_target,
    make_tokenizer,
    tv_bound,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.candidate_generator import AssistedCandidateGenerator
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import dspark_hf.speculative.hook as hook
import dspark_hf.speculative.round as speculative_module
from dspark_hf import DSparkDraftModel, speculative_decoding
from dspark_hf.scheduling import (
    CostTable,
    LaggedSchedulerPolicy,
    PrefixSchedulerPolicy,
    StaticThresholdPolicy,
)
from dspark_hf.speculative.decoding import DSparkProposer, prompt_lookup
from dspark_hf.speculative.round import sample_block

VOCAB = 32
HEADS = ["markov", "gated", "rnn", "none"]


def new_draft(target, head="markov", block_size=4, seed=1):
    return make_draft(target, block_size=block_size, head=head, seed=seed)


def greedy_pair(target, draft, prompt, speculation: dict | None = None, **kwargs):
    """Plain and drafted greedy outputs of the same call; `speculation` holds keywords for the drafted call only
    (verification_policy, lookup_min_probability)."""
    reference = target.generate(prompt, do_sample=False, **kwargs)
    speculative = target.generate(prompt, do_sample=False, assistant_model=draft, **(speculation or {}), **kwargs)
    return reference, speculative


def greedy_pair_with_stats(target, draft, prompt, speculation: dict | None = None, **kwargs):
    """`greedy_pair`'s sequences and the drafted call's `SpeculationStats`."""
    reference = target.generate(prompt, do_sample=False, **kwargs)
    out = target.generate(
        prompt, do_sample=False, assistant_model=draft, return_dict_in_generate=True, **(speculation or {}), **kwargs
    )
    return reference, out.sequences, out.speculation_stats


@pytest.fixture(scope="module")
def trained_drafts(targets):
    """Briefly distilled drafts (γ = 16) per target family and head type; γ is lowered per test case."""
    return {
        (family, head): briefly_train(new_draft(target, head, block_size=16), target, steps=120, batch=32)
        for family, target in targets.items()
        for head in HEADS
    }


def make_policy(name, block_size):
    if name == "threshold":
        return StaticThresholdPolicy(0.5)
    if name == "scheduler":
        # A table where verifying long blocks stops paying, so the scheduler truncates.
        sizes = [1, 2, 4, 8, 16, 32]
        return PrefixSchedulerPolicy(CostTable(sizes, [100.0, 95.0, 80.0, 55.0, 30.0, 15.0]))
    return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["llama", "qwen3"]),
    head=st.sampled_from(HEADS),
    block_size=st.integers(1, 16),
    trained=st.booleans(),
    policy=st.sampled_from([None, "threshold", "scheduler"]),
    prompt=st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=12),
    max_new_tokens=st.integers(1, 40),
    draft_vocabulary=st.sampled_from([None, list(range(0, VOCAB, 2))]),
)
def test_greedy_output_identical_to_plain_generate(
    targets, trained_drafts, family, head, block_size, trained, policy, prompt, max_new_tokens, draft_vocabulary
):
    target = targets[family]
    draft = trained_drafts[(family, head)] if trained else new_draft(target, head, block_size)
    draft.config.block_size = block_size
    draft.set_draft_vocabulary(draft_vocabulary)
    try:
        reference, speculative, stats = greedy_pair_with_stats(
            target, draft, torch.tensor([prompt]), {"verification_policy": make_policy(policy, block_size)},
            max_new_tokens=max_new_tokens,
        )
    finally:
        draft.config.block_size = 16 if trained else block_size
        draft.set_draft_vocabulary(None)
    assert torch.equal(reference, speculative)
    generated = reference.shape[1] - len(prompt)
    assert sum(stats.accepted) + stats.num_rounds == generated - 1  # the prefill produced the first token
    assert all(p <= block_size for p in stats.proposed)


def test_trained_drafts_are_accepted(targets, trained_drafts):
    """Guards the property test above: trained drafts really produce accepted rounds."""
    taus = []
    for (family, _head), draft in trained_drafts.items():
        draft.config.block_size = 8
        for seed in range(3):
            prompt = torch.randint(0, VOCAB - 1, (1, 5), generator=torch.Generator().manual_seed(seed))
            reference, speculative, stats = greedy_pair_with_stats(targets[family], draft, prompt, max_new_tokens=40)
            assert torch.equal(reference, speculative)
            taus.append(stats.tau)
        draft.config.block_size = 16
    assert sum(taus) / len(taus) > 1.5, taus


def test_policy_can_propose_zero_tokens(targets):
    target = targets["llama"]
    draft = new_draft(target)
    never = {"verification_policy": StaticThresholdPolicy(1.0)}  # nothing is ever confident enough
    reference, speculative, stats = greedy_pair_with_stats(target, draft, torch.tensor([[3, 4, 5]]), never, max_new_tokens=12)
    assert torch.equal(reference, speculative)
    assert stats.proposed == [0] * 11 and stats.tau == 1.0


def test_static_cache_and_max_length(targets):
    target = targets["qwen3"]
    draft = new_draft(target, block_size=8)
    reference, speculative = greedy_pair(target, draft, torch.tensor([[1, 2, 3]]), max_length=20,
                                         cache_implementation="static")
    assert torch.equal(reference, speculative) and speculative.shape[1] == 20


def test_eos_stops_like_plain_generate(trained_drafts, targets):
    target, draft = targets["llama"], trained_drafts[("llama", "markov")]
    prompt = torch.tensor([[7, 8, 9]])
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
    eos = int(reference[0, 10])  # a token the target emits mid-way
    reference, speculative = greedy_pair(target, draft, prompt, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(reference, speculative)
    assert speculative[0, -1] == eos and (speculative[0, 3:-1] != eos).all()


def test_stopping_criteria_cut_exactly_where_plain_generate_stops(trained_drafts, targets):
    target, draft = targets["llama"], trained_drafts[("llama", "markov")]
    draft.config.block_size = 8
    prompt = torch.tensor([[2, 9, 4]])
    stop_token = int(target.generate(prompt, max_new_tokens=30, do_sample=False)[0, 14])

    class StopOnToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    kwargs = dict(max_new_tokens=30, return_dict_in_generate=True, output_scores=True,
                  stopping_criteria=StoppingCriteriaList([StopOnToken()]))
    try:
        reference, speculative = greedy_pair(target, draft, prompt, **kwargs)
    finally:
        draft.config.block_size = 16
    assert speculative.sequences[0, -1] == stop_token
    assert torch.equal(reference.sequences, speculative.sequences)
    assert len(reference.scores) == len(speculative.scores)


def test_lagged_policy_is_lossless_in_generate(targets, trained_drafts):
    target, draft = targets["qwen3"], trained_drafts[("qwen3", "rnn")]
    draft.config.block_size = 6
    lagged = {"verification_policy": LaggedSchedulerPolicy(CostTable([1, 4, 16], [100.0, 80.0, 30.0]))}
    try:
        reference, speculative = greedy_pair(target, draft, torch.tensor([[5, 6, 7]]), lagged, max_new_tokens=30)
    finally:
        draft.config.block_size = 16
    assert torch.equal(reference, speculative)


def _lookup_match(sequence: list[int]) -> int:
    """Length (2, 1 or 0) of the longest suffix n-gram, n ≤ 2, that occurs earlier with a token after it."""
    for n in (2, 1):
        if len(sequence) > n and any(sequence[i : i + n] == sequence[-n:] for i in range(len(sequence) - n)):
            return n
    return 0


@pytest.fixture
def lookup_results(monkeypatch):
    """Whether each round's prompt lookup found a continuation (none at the end of the budget or before an EOS)."""
    found = []
    look_up = DSparkProposer._look_up

    def recording_look_up(self, input_ids, budget):
        continuation = look_up(self, input_ids, budget)
        found.append(continuation is not None)
        return continuation

    monkeypatch.setattr(DSparkProposer, "_look_up", recording_look_up)
    return found


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("min_probability", [0.0, 0.035, 1.1])
def test_prompt_lookup_with_draft_is_identical_to_plain_greedy(
    targets, trained_drafts, lookup_results, family, min_probability
):
    """A round verifies the looked-up continuation after a 2-gram match, after a 1-token match when the draft gives its
    next token at least `lookup_min_probability` (0: always, 1.1: never), and the drafted block otherwise; greedy
    output stays identical to plain decoding, including where max_length cuts a continuation short."""
    target, draft = targets[family], trained_drafts[(family, "markov")]
    draft.config.block_size = 4
    kinds = {"2-gram looked up": 0, "1-gram looked up": 0, "1-gram drafted": 0, "drafted": 0}
    try:
        for seed in range(4):
            prompt = torch.randint(0, VOCAB - 1, (1, 6), generator=torch.Generator().manual_seed(seed))
            for max_new_tokens in (7, 48):
                reference, speculative, stats = greedy_pair_with_stats(
                    target, draft, prompt, {"lookup_min_probability": min_probability}, max_new_tokens=max_new_tokens,
                    prompt_lookup_num_tokens=6,
                )
                assert torch.equal(reference, speculative)
                assert sum(stats.accepted) + stats.num_rounds == reference.shape[1] - prompt.shape[1] - 1
                assert all(p <= (6 if lookup else 4) for p, lookup in zip(stats.proposed, stats.looked_up, strict=True))
                found = lookup_results[-stats.num_rounds :]
                length = prompt.shape[1] + 1  # the prefill emits one token before the first round
                for accepted, looked_up, continued in zip(stats.accepted, stats.looked_up, found, strict=True):
                    match = _lookup_match(reference[0, :length].tolist()) if continued else 0
                    assert not looked_up or match, "looked up without a continuation"
                    if match == 2:
                        assert looked_up, "a 2-gram match must be looked up"
                    if min_probability == 0.0 and match:
                        assert looked_up, "lookup_min_probability=0 looks up every match"
                    if min_probability > 1.0 and match == 1:
                        assert not looked_up, "no draft probability reaches lookup_min_probability > 1"
                    kind = {2: "2-gram", 1: "1-gram"}.get(match)
                    key = "drafted" if kind is None else f"{kind} {'looked up' if looked_up else 'drafted'}"
                    kinds[key] += 1
                    length += accepted + 1
    finally:
        draft.config.block_size = 16
    assert kinds["2-gram looked up"] > 0 and kinds["drafted"] > 0, kinds
    if min_probability == 0.035:  # the draft's probability decides 1-gram matches both ways
        assert kinds["1-gram looked up"] > 0 and kinds["1-gram drafted"] > 0, kinds


def test_sampling_with_prompt_lookup_matches_target_distribution(sampling_setup):
    """8k sampled generations after a prompt whose tokens repeat, so the first round often finds a looked-up
    continuation; with `lookup_min_probability` = 0.1 the draft turns some 1-token matches down. TV of (t2, t3)
    stays within the McDiarmid bound for that sample size."""
    target, draft, _, _ = sampling_setup
    prompt = torch.tensor([[1, 2, 3, 1, 2, 3]])
    exact = exact_two_token_distribution(target, prompt)
    runs, looked_up, declined = 8_000, 0, 0
    counts = torch.zeros_like(exact)
    torch.manual_seed(2)
    for _ in range(runs):
        result = target.generate(
            prompt, max_new_tokens=4, do_sample=True, top_k=0, assistant_model=draft, prompt_lookup_num_tokens=3,
            lookup_min_probability=0.1, return_dict_in_generate=True,
        )
        out = result.sequences
        counts[out[0, prompt.shape[1] + 1], out[0, prompt.shape[1] + 2]] += 1
        first_round_looked_up = result.speculation_stats.looked_up[0]
        looked_up += first_round_looked_up
        # The prefill's token t1 has a lookup match iff it occurs in the prompt.
        declined += int(out[0, prompt.shape[1]]) in (1, 2, 3) and not first_round_looked_up
    tv = 0.5 * (counts / runs - exact).abs().sum().item()
    assert 0.1 * runs < looked_up < 0.9 * runs and 0.03 * runs < declined, (looked_up, declined)
    assert tv < tv_bound(exact, runs), (tv, tv_bound(exact, runs))


@pytest.fixture
def seeding_record(monkeypatch):
    """(looked-up first token or None, 2-gram match, first proposed token, seeded, looked up) of every proposal."""
    record = []
    propose, look_up = DSparkProposer.propose, DSparkProposer._look_up

    def recording_propose(self, input_ids, budget):
        continuation = look_up(self, input_ids, budget)
        proposal = propose(self, input_ids, budget)
        first = None if proposal.block is None else int(proposal.block.tokens[0, 0])
        looked_up = None if continuation is None else int(continuation[0, 0])
        record.append((looked_up, self._long_match(input_ids), first, proposal.seeded, proposal.looked_up))
        return proposal

    monkeypatch.setattr(DSparkProposer, "propose", recording_propose)
    return record


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["llama", "qwen3"]),
    head=st.sampled_from(HEADS),
    block_size=st.integers(1, 8),
    policy=st.sampled_from([None, "threshold"]),
    prompt=st.lists(st.integers(0, 5), min_size=2, max_size=12),  # few distinct tokens: lookups match often
    max_new_tokens=st.integers(1, 40),
    lookup_mode=st.sampled_from(["seed", "hybrid"]),
)
def test_lookup_seeded_blocks_are_identical_to_plain_greedy(
    targets, trained_drafts, seeding_record, family, head, block_size, policy, prompt, max_new_tokens, lookup_mode
):
    """With lookup_mode="seed", a round whose lookup finds a continuation drafts a block that starts with the
    continuation's first token, and any other round drafts as usual; "hybrid" verifies 2-gram matches' continuations
    instead. Greedy output stays identical to plain decoding."""
    target, draft = targets[family], trained_drafts[(family, head)]
    draft.config.block_size = block_size
    seeding_record.clear()
    try:
        reference, speculative, stats = greedy_pair_with_stats(
            target, draft, torch.tensor([prompt]),
            {"lookup_mode": lookup_mode, "verification_policy": make_policy(policy, block_size)},
            max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=3,
        )
    finally:
        draft.config.block_size = 16
    assert torch.equal(reference, speculative)
    assert sum(stats.accepted) + stats.num_rounds == reference.shape[1] - len(prompt) - 1
    assert all(p <= block_size for p, whole in zip(stats.proposed, stats.looked_up, strict=True) if not whole)
    assert [seeded for *_, seeded, _ in seeding_record] == stats.seeded
    assert [whole for *_, whole in seeding_record] == stats.looked_up
    for looked_up, long_match, first, seeded, whole in seeding_record:
        verified_whole = lookup_mode == "hybrid" and looked_up is not None and long_match
        assert whole == verified_whole and seeded == (looked_up is not None and not verified_whole)
        if looked_up is not None:
            assert first == looked_up


def test_lookup_seeding_happens_and_pays_where_the_text_repeats(targets, trained_drafts, seeding_record):
    """Guards the property test above: on a prompt that repeats, most rounds are seeded and accepted tokens follow."""
    target, draft = targets["llama"], trained_drafts[("llama", "markov")]
    draft.config.block_size = 4
    try:
        prompt = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])
        reference, speculative, stats = greedy_pair_with_stats(
            target, draft, prompt, {"lookup_mode": "seed"}, max_new_tokens=24, prompt_lookup_num_tokens=3
        )
    finally:
        draft.config.block_size = 16
    assert torch.equal(reference, speculative)
    assert sum(stats.seeded) > 0 and stats.tau > 1.0, (stats.seeded, stats.tau)


def test_unknown_lookup_mode_is_refused(targets):
    target = targets["llama"]
    with pytest.raises(ValueError, match="lookup_mode must be one of"):
        target.generate(torch.tensor([[1, 2]]), max_new_tokens=3, assistant_model=new_draft(target),
                        prompt_lookup_num_tokens=2, lookup_mode="token")


def _lookup_seeded_two_token_distribution(target, draft, prompt, runs):
    """Empirical P(t2, t3) of `runs` sampled calls with lookup-seeded blocks, and how many first rounds were seeded."""
    counts = torch.zeros(target.config.vocab_size, target.config.vocab_size, dtype=torch.float64)
    seeded = 0
    for _ in range(runs):
        result = target.generate(
            prompt, max_new_tokens=4, do_sample=True, top_k=0, assistant_model=draft, prompt_lookup_num_tokens=3,
            lookup_mode="seed", return_dict_in_generate=True,
        )
        out = result.sequences
        counts[out[0, prompt.shape[1] + 1], out[0, prompt.shape[1] + 2]] += 1
        seeded += result.speculation_stats.seeded[0]
    return counts / runs, seeded


def test_sampling_with_lookup_seeded_blocks_matches_target_distribution(sampling_setup):
    """4k sampled generations after a prompt whose tokens repeat, so the first round is often seeded with a looked-up
    token (t2) that the sequential head continues (t3): TV of (t2, t3) stays within the McDiarmid bound."""
    target, draft, _, _ = sampling_setup
    prompt = torch.tensor([[1, 2, 3, 1, 2, 3]])
    exact = exact_two_token_distribution(target, prompt)
    torch.manual_seed(3)
    empirical, seeded = _lookup_seeded_two_token_distribution(target, draft, prompt, runs=4_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert 0.1 * 4_000 < seeded < 0.9 * 4_000, seeded
    assert tv < tv_bound(exact, 4_000), (tv, tv_bound(exact, 4_000))


def test_a_seeded_token_checked_against_the_drafts_distribution_is_detected(sampling_setup, monkeypatch):
    """The same statistic, same sample size, exceeds the bound when a seeded token is accepted as if the draft had drawn it (its
    proposal distribution taken as the draft's logits instead of one-hot at it)."""
    target, draft, _, _ = sampling_setup
    prompt = torch.tensor([[1, 2, 3, 1, 2, 3]])
    exact = exact_two_token_distribution(target, prompt)
    original = speculative_module.sample_block

    def draft_distribution_for_seeds(*args, **kwargs):
        block = original(*args, **kwargs)
        if kwargs.get("first_tokens") is not None:
            unseeded = original(*args, **{**kwargs, "first_tokens": None})
            block.logits[:, 0] = unseeded.logits[:, 0]
        return block

    monkeypatch.setattr(speculative_module, "sample_block", draft_distribution_for_seeds)
    torch.manual_seed(3)
    empirical, _ = _lookup_seeded_two_token_distribution(target, draft, prompt, runs=4_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv > tv_bound(exact, 4_000), (tv, tv_bound(exact, 4_000))


class CollectingStreamer(BaseStreamer):
    """Keeps every chunk put to it and whether it was ended."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_logits_processors_and_streamer(targets):
    target = targets["llama"]
    draft = new_draft(target)
    streamer = CollectingStreamer()
    kwargs = dict(max_new_tokens=25, repetition_penalty=1.3, no_repeat_ngram_size=3)
    reference = target.generate(torch.tensor([[4, 5, 6]]), do_sample=False, **kwargs)
    speculative = target.generate(torch.tensor([[4, 5, 6]]), do_sample=False, assistant_model=draft,
                                  streamer=streamer, **kwargs)
    assert torch.equal(reference, speculative)
    assert [t for chunk in streamer.chunks for t in chunk] == speculative[0].tolist() and streamer.ended


def test_text_generation_pipeline_takes_the_draft(targets, monkeypatch):
    from transformers import pipeline

    tokenizer = make_tokenizer(VOCAB)
    target = targets["llama"]
    draft = new_draft(target)
    proposals, propose = [], DSparkProposer.propose
    monkeypatch.setattr(DSparkProposer, "propose", lambda self, *a, **k: proposals.append(1) or propose(self, *a, **k))
    settings = dict(max_new_tokens=12, do_sample=False)
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)("w4 w5 w6", **settings)
    speculative = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=draft)("w4 w5 w6", **settings)
    assert speculative == plain
    assert proposals, "the pipeline's generate() did not run DSpark's loop"


def test_return_dict_with_hidden_states_and_scores(targets):
    target = targets["llama"]
    draft = new_draft(target)
    kwargs = dict(max_new_tokens=10, return_dict_in_generate=True, output_hidden_states=True, output_scores=True)
    reference, speculative = greedy_pair(target, draft, torch.tensor([[1, 2, 3, 4]]), **kwargs)
    assert torch.equal(reference.sequences, speculative.sequences)
    assert len(speculative.scores) == len(reference.scores) == 10
    for a, b in zip(reference.scores, speculative.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Every layer comes back (the draft did not narrow the selection the user asked for).
    assert all(h is not None for step in speculative.hidden_states for h in step)
    assert len(speculative.hidden_states[0]) == target.config.num_hidden_layers + 1


def test_return_dict_with_attentions_matches_plain_generate():
    """Eager attention: one attention tuple per new token, over the keys plain decoding had at that step."""
    target = make_target("llama", vocab_size=VOCAB, attn_implementation="eager")
    draft = new_draft(target)
    kwargs = dict(max_new_tokens=8, return_dict_in_generate=True, output_attentions=True)
    reference, speculative = greedy_pair(target, draft, torch.tensor([[1, 2, 3, 4]]), **kwargs)
    assert torch.equal(reference.sequences, speculative.sequences)
    assert len(reference.attentions) == len(speculative.attentions) == 8
    for step, (a, b) in enumerate(zip(reference.attentions, speculative.attentions, strict=True)):
        for layer_a, layer_b in zip(a, b, strict=True):
            assert layer_a.shape == layer_b.shape, step
            torch.testing.assert_close(layer_a, layer_b, rtol=1e-4, atol=1e-5)


def test_greedy_acceptance_equals_speculative_sampling_with_one_hot_target():
    """The all-greedy shortcut of speculative_accept gives what the general rule gives with one-hot p."""
    from dspark_hf.speculative.round import DraftBlock, speculative_accept

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows, longest, vocab = 3, 5, 6
        logits = torch.randn(rows, longest + 1, vocab, generator=generator)
        one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        tokens = torch.where(torch.rand(rows, longest, generator=generator) < 0.7, logits[:, :-1].argmax(-1),
                             torch.randint(0, vocab, (rows, longest), generator=generator))
        block = DraftBlock(tokens, torch.randn(rows, longest, vocab, generator=generator), None, None)
        lengths = torch.randint(0, longest + 1, (rows,), generator=generator)
        fast = speculative_accept(one_hot, block, lengths, torch.ones(rows, dtype=torch.bool))
        general = speculative_accept(one_hot, block, lengths)
        assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])


def test_sample_block_draws_from_returned_logits():
    """Each drafted token is a sample of softmax(returned logits) at its position (checked by frequency)."""
    target = make_target("llama", vocab_size=8, hidden_size=32, num_layers=3)
    draft = new_draft(target, block_size=2)
    torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=1.0)
    hidden = torch.randn(1, 2, 32).expand(4000, -1, -1)
    block = sample_block(draft, hidden, torch.full((4000,), 3), do_sample=True)
    probs = torch.softmax(block.logits[:, 1], dim=-1)  # depends on each row's sampled first token
    counts = torch.zeros(8)
    expected = torch.zeros(8)
    for first in range(8):
        rows = block.tokens[:, 0] == first
        counts += torch.bincount(block.tokens[rows, 1], minlength=8)
        expected += probs[rows].sum(0)
    assert ((counts - expected).abs() / expected.clamp(min=1).sqrt()).max() < 5


def test_sample_block_with_draft_vocabulary_keeps_its_tokens_logits():
    """Drafting within a draft vocabulary: its tokens keep their full-vocabulary logits, the others get −inf."""
    target = make_target("llama", vocab_size=16, hidden_size=32, num_layers=3)
    for head in HEADS:
        draft = new_draft(target, head=head, block_size=3)
        if draft.markov_head is not None:
            torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=1.0)
        vocabulary = torch.tensor([0, 3, 4, 9, 14])
        draft.set_draft_vocabulary(vocabulary)
        hidden, anchors = torch.randn(200, 3, 32), torch.randint(0, 16, (200,))
        block = sample_block(draft, hidden, anchors, do_sample=True)
        assert torch.isin(block.tokens, vocabulary).all()
        prev = torch.cat([anchors[:, None], block.tokens[:, :-1]], dim=1)  # teacher-force the drawn tokens
        with torch.no_grad():
            full = draft.sequential_logits(draft.compute_logits(hidden), hidden, prev).float()
        torch.testing.assert_close(block.logits[..., vocabulary], full[..., vocabulary])
        outside = torch.ones(16, dtype=torch.bool)
        outside[vocabulary] = False
        assert torch.isneginf(block.logits[..., outside]).all()


def _empirical_two_token_distribution(target, draft, prompt, runs):
    vocab = target.config.vocab_size
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for _ in range(runs):
        out = target.generate(prompt, max_new_tokens=4, do_sample=True, top_k=0, assistant_model=draft)
        counts[out[0, prompt.shape[1] + 1], out[0, prompt.shape[1] + 2]] += 1
    return counts / runs


@pytest.fixture(scope="module")
def sampling_setup():
    target, draft, prompt = make_sampling_setup()
    return target, draft, prompt, exact_two_token_distribution(target, prompt)


def test_sampling_matches_target_distribution(sampling_setup):
    """20k sampled generations: TV(empirical, exact) of (t2, t3) is within the sampling-noise bound.

    t2 and t3 come from the first drafted round (the prefill emits t1). With K = 64 cells and n = 20k runs,
    E[TV] ≤ ½·√(K/n)·√(2/π) ≈ 0.023 for an exact sampler; we allow 0.035.
    """
    target, draft, prompt, exact = sampling_setup
    torch.manual_seed(0)
    empirical = _empirical_two_token_distribution(target, draft, prompt, runs=20_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < 0.035, tv


def test_sampling_with_a_draft_vocabulary_matches_target_distribution(sampling_setup):
    """4k sampled generations with tokens 1, 4 and 7 never drafted (they come only from the residual): TV of
    (t2, t3) stays within the McDiarmid bound for that sample size."""
    target, draft, prompt, exact = sampling_setup
    restricted = copy.deepcopy(draft).set_draft_vocabulary([0, 2, 3, 5, 6])
    torch.manual_seed(1)
    empirical = _empirical_two_token_distribution(target, restricted, prompt, runs=4_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < tv_bound(exact, 4_000), (tv, tv_bound(exact, 4_000))


@pytest.mark.parametrize("head", ["gated", "rnn"])
def test_sampling_with_hidden_state_dependent_heads_matches_target_distribution(head):
    """4k sampled generations with a head whose bias depends on the hidden state as well as the previous token (gated
    Markov, RNN): TV of (t2, t3) stays within the McDiarmid bound for that sample size."""
    target, draft, prompt = make_sampling_setup(head)
    exact = exact_two_token_distribution(target, prompt)
    torch.manual_seed(2)
    empirical = _empirical_two_token_distribution(target, draft, prompt, runs=4_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < tv_bound(exact, 4_000), (tv, tv_bound(exact, 4_000))


def test_biased_drafting_is_detected(sampling_setup, monkeypatch):
    """The same statistic clearly exceeds the bound when drafted tokens are not sampled from their logits."""
    target, draft, prompt, exact = sampling_setup
    def argmax_sample_block(*args, **kwargs):  # drafts the argmax but reports the soft logits as its distribution
        return original(*args, **{**kwargs, "do_sample": False})

    original = speculative_module.sample_block
    monkeypatch.setattr(speculative_module, "sample_block", argmax_sample_block)
    torch.manual_seed(0)
    empirical = _empirical_two_token_distribution(target, draft, prompt, runs=3_000)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv > 0.1, tv


def test_batch_size_above_one_is_refused(targets):
    target = targets["llama"]
    with pytest.raises(ValueError, match="batch size 2.*DSparkEngine"):
        target.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3, assistant_model=new_draft(target))


def test_beam_search_is_refused(targets):
    target = targets["llama"]
    with pytest.raises(ValueError, match="greedy decoding and sampling only"):
        target.generate(torch.tensor([[1, 2]]), max_new_tokens=3, num_beams=2, assistant_model=new_draft(target))


def test_mismatched_draft_is_refused(targets):
    other = make_target("llama", vocab_size=VOCAB, hidden_size=32)
    with pytest.raises(ValueError, match="hidden_size"):
        targets["llama"].generate(torch.tensor([[1, 2]]), max_new_tokens=3, assistant_model=new_draft(other))


def test_policy_without_confidence_head_is_refused(targets):
    target = targets["llama"]
    draft = DSparkDraftModel.from_target(target, confidence_head=False, mask_token_id=VOCAB - 1)
    with pytest.raises(ValueError, match="confidence head"):
        target.generate(torch.tensor([[1, 2]]), max_new_tokens=3, assistant_model=draft,
                        verification_policy=StaticThresholdPolicy(0.5))


def test_other_assistants_are_untouched(targets, monkeypatch):
    target = targets["llama"]
    chosen = []
    original = AssistedCandidateGenerator.__init__

    def spy(self, *args, **kwargs):
        chosen.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(AssistedCandidateGenerator, "__init__", spy)
    assistant = make_target("llama", vocab_size=VOCAB, num_layers=2, seed=5)
    prompt = torch.tensor([[1, 2, 3]])
    reference = target.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(target.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=assistant), reference)
    assert torch.equal(target.generate(prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3), reference)
    assert chosen == ["AssistedCandidateGenerator"]


def test_hook_installs_once_and_uninstalls():
    from transformers.generation.utils import GenerationMixin

    wrapped = GenerationMixin.generate
    hook.install()
    assert GenerationMixin.generate is wrapped
    hook.uninstall()
    try:
        assert not hasattr(GenerationMixin.generate, "__dspark_original__")
    finally:
        hook.install()
    assert hasattr(GenerationMixin.generate, "__dspark_original__")


def test_custom_generate_needs_no_hook(targets):
    """`generate(custom_generate=speculative_decoding, draft=...)` is transformers' own public entry: it works with the
    generate() wrapper removed, greedy output is identical, and the streamer gets the prompt, every token and end()."""
    target = targets["qwen3"]
    draft = new_draft(target)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    reference = target.generate(prompt, max_new_tokens=20, do_sample=False)
    hook.uninstall()
    try:
        streamer = CollectingStreamer()
        out = target.generate(prompt, max_new_tokens=20, do_sample=False, custom_generate=speculative_decoding,
                              draft=draft, token_streamer=streamer, return_dict_in_generate=True)
        speculative, rounds = out.sequences, out.speculation_stats.num_rounds
        with_assistant = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=draft,
                                         custom_generate=speculative_decoding, draft=draft)
        with pytest.raises(TypeError, match="draft=draft"):
            target.generate(prompt, max_new_tokens=5, custom_generate=speculative_decoding)
    finally:
        hook.install()
    assert torch.equal(reference, speculative) and torch.equal(reference, with_assistant)
    assert rounds > 0 and streamer.chunks[0] == prompt[0].tolist()
    assert [t for chunk in streamer.chunks for t in chunk] == speculative[0].tolist() and streamer.ended


def test_custom_generate_and_a_draft_assistant_together_are_refused(targets):
    target = targets["llama"]
    with pytest.raises(ValueError, match="Drop one of them"):
        target.generate(torch.tensor([[1, 2]]), max_new_tokens=3, assistant_model=new_draft(target),
                        custom_generate=speculative_decoding)


def test_no_transformers_private_method_is_patched():
    """The hook wraps the public generate() only: no assignment to an underscore attribute of GenerationMixin."""
    import pathlib
    import re

    from transformers.generation.utils import GenerationMixin

    pattern = re.compile(r"GenerationMixin\._\w+\s*=|setattr\(\s*GenerationMixin\s*,\s*['\"]_")
    source = pathlib.Path(hook.__file__).parent
    offenders = [str(p) for p in source.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders
    assert all(not hasattr(getattr(GenerationMixin, name), "__dspark_original__")
               for name in dir(GenerationMixin) if name.startswith("_") and callable(getattr(GenerationMixin, name)))


@settings(max_examples=200, deadline=None)
@given(
    sequence=st.lists(st.integers(0, 5), min_size=1, max_size=30),
    num_tokens=st.integers(1, 8),
    ngram=st.integers(1, 3),
    eos=st.sampled_from([None, 2]),
)
def test_prompt_lookup_matches_transformers(sequence, num_tokens, ngram, eos):
    """Our prompt lookup proposes exactly what transformers' PromptLookupCandidateGenerator proposes."""
    from transformers.generation import PromptLookupCandidateGenerator

    input_ids = torch.tensor([sequence])
    eos_ids = None if eos is None else torch.tensor([eos])
    reference = PromptLookupCandidateGenerator(
        eos_token_id=eos_ids, num_output_tokens=num_tokens, max_matching_ngram_size=ngram, max_length=1000
    )
    candidates, _ = reference.get_candidates(input_ids)
    expected = candidates[:, len(sequence):]
    ours = prompt_lookup(input_ids, num_tokens, ngram, eos_ids)
    assert (ours is None and expected.shape[1] == 0) or torch.equal(ours, expected)
