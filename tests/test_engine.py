"""DSparkEngine: lossless batched speculative decoding under continuous batching."""

import copy

import pytest
import torch
from conftest import (
    briefly_train,
    exact_two_token_distribution,
    make_draft,
    make_sampling_setup,
    make_target,
    tv_bound,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import dspark_hf.engine.engine as engine_module
import dspark_hf.speculative.round as speculative_module
from dspark_hf.engine import DSparkEngine, SamplingParams, warp_logits
from dspark_hf.scheduling import (
    CostTable,
    GlobalSearchPolicy,
    LaggedSchedulerPolicy,
    PrefixSchedulerPolicy,
    StaticThresholdPolicy,
    profile_draft_cost,
    profile_verify_cost,
)
from dspark_hf.speculative.round import draw_tokens
from dspark_hf.speculative.sampling import RequestSamplingWarper

VOCAB = 32
CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"  # ids 0..30; 31 is "<eos>" (and the drafts' mask token)
# A capacity curve where verifying long blocks stops paying, so Algorithm 1 and the lagged policy truncate.
LOAD_TABLE = CostTable([1, 2, 4, 8, 16, 32, 64], [100.0, 95.0, 80.0, 55.0, 30.0, 15.0, 7.5])
# The same curve with a draft pass of 4 ms per request: drafting pays for trained drafts, not for untrained ones.
DRAFT_COST_TABLE = LOAD_TABLE.with_draft_cost([1, 64], [0.004, 0.256])
POLICIES = ["none", "mtp1", "full", "threshold", "prefix", "prefix_draft_cost", "lagged"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One character per token over the tiny vocabulary, with a chat template that concatenates the messages."""
    vocab = {c: i for i, c in enumerate(CHARS)} | {"<eos>": VOCAB - 1}
    model = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    model.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def new_draft(target, block_size=6, head="markov", seed=1, **kwargs):
    return make_draft(target, block_size=block_size, head=head, seed=seed, **kwargs)


def make_engine(target, draft, policy, **kwargs):
    """An engine for one of POLICIES (mtp1 = full-block verification of a one-token draft)."""
    if policy == "mtp1":
        return DSparkEngine(target, draft, scheduler="full", max_draft_tokens=1, **kwargs)
    if policy == "threshold":
        return DSparkEngine(target, draft, scheduler=StaticThresholdPolicy(0.5), **kwargs)
    if policy == "lagged":
        return DSparkEngine(target, draft, scheduler=LaggedSchedulerPolicy(LOAD_TABLE, cold_start_length=2), **kwargs)
    if policy == "none":
        return DSparkEngine(target, None, **kwargs)
    if policy == "prefix_draft_cost":
        return DSparkEngine(target, draft, scheduler="prefix", cost_table=DRAFT_COST_TABLE, **kwargs)
    return DSparkEngine(target, draft, scheduler=policy, cost_table=LOAD_TABLE, **kwargs)


def reference(target, prompt, max_new_tokens, **kwargs):
    out = target.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


def run_arrivals(engine, arrivals):
    """Adds each (round, prompt, params) at its round, stepping once per round, until everything finished."""
    requests, step = [None] * len(arrivals), 0
    while step <= max(a[0] for a in arrivals) or engine.has_unfinished():
        for i, (at, prompt, params) in enumerate(arrivals):
            if at == step:
                requests[i] = engine.add_request(prompt, params)
        engine.step()
        step += 1
    return requests


@pytest.fixture(scope="module")
def drafts(targets):
    """Per family: a briefly distilled draft (accepted often) and an untrained one (rejected often), γ = 6."""
    return {
        (family, trained): briefly_train(new_draft(target), target, steps=100, batch=32) if trained else new_draft(target)
        for family, target in targets.items()
        for trained in (True, False)
    }


# ----------------------------------------------------------------------------------------------------------------------
# Greedy: identical to plain generate, request by request
# ----------------------------------------------------------------------------------------------------------------------

request_strategy = st.tuples(
    st.integers(0, 5),  # arrival round
    st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=10),  # prompt
    st.integers(1, 24),  # max_new_tokens
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["llama", "qwen3"]),
    trained=st.booleans(),
    policy=st.sampled_from(POLICIES),
    mix=st.lists(request_strategy, min_size=1, max_size=6),
    compact_threshold=st.sampled_from([0.0, 0.5, 1.0]),
    max_batch_size=st.sampled_from([None, 2]),
)
def test_greedy_requests_identical_to_plain_generate(
    targets, drafts, family, trained, policy, mix, compact_threshold, max_batch_size
):
    target = targets[family]
    engine = make_engine(target, drafts[(family, trained)], policy, compact_threshold=compact_threshold,
                         max_batch_size=max_batch_size)
    arrivals = [(at, prompt, SamplingParams(max_new_tokens=n)) for at, prompt, n in mix]
    for request, (_, prompt, params) in zip(run_arrivals(engine, arrivals), arrivals, strict=True):
        assert request.token_ids == reference(target, prompt, params.max_new_tokens)
        assert request.finish_reason == "length"
        stats = request.stats
        assert sum(stats.accepted) + stats.num_rounds == len(request.token_ids) - 1  # the prefill emits one
        assert all(p <= (1 if policy == "mtp1" else 6) for p in stats.proposed)
        if policy == "none":
            assert sum(stats.proposed) == 0
    assert engine.num_active == 0 and engine.stats.finished_requests == len(mix)


@pytest.mark.parametrize("head", ["gated", "rnn", "none"])
def test_every_head_type_serves_greedy_requests_identical_to_plain_generate(targets, head):
    target = targets["qwen3"]
    draft = new_draft(target, head=head)
    for name, parameter in (draft.markov_head.named_parameters() if draft.markov_head is not None else []):
        if name != "markov_w1.weight":  # W2 starts at zero: give the head something to do
            torch.nn.init.normal_(parameter, std=0.5)
    engine = make_engine(target, draft, "threshold")
    arrivals = [(0, [1, 2, 3], SamplingParams(max_new_tokens=12)), (1, [4, 5], SamplingParams(max_new_tokens=9))]
    for request, (_, prompt, params) in zip(run_arrivals(engine, arrivals), arrivals, strict=True):
        assert request.token_ids == reference(target, prompt, params.max_new_tokens)


@pytest.mark.parametrize(
    "poison",
    [
        SamplingParams(max_new_tokens=8, do_sample=True, top_k=9223372036854775813),  # overflows the top-k tensor
        SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e-50),  # infinite logits: no distribution
    ],
    ids=["top_k_overflow", "tiny_temperature"],
)
def test_a_poisoned_request_fails_alone(targets, drafts, poison):
    """A request whose prefill raises finishes with an error; the healthy requests that joined with it finish with
    the same tokens as alone, and the engine goes idle."""
    target = targets["llama"]
    engine = make_engine(target, drafts[("llama", True)], "full")
    healthy = [([1, 2, 3], 12), ([4, 5], 9), ([6], 14)]
    arrivals = [(0, prompt, SamplingParams(max_new_tokens=n)) for prompt, n in healthy]
    arrivals.insert(1, (0, [7, 8], poison))
    requests = run_arrivals(engine, arrivals)
    assert requests[1].finish_reason == "error" and requests[1].error
    for request, (_, prompt, params) in zip(requests[:1] + requests[2:], arrivals[:1] + arrivals[2:], strict=True):
        assert request.finish_reason == "length"
        assert request.token_ids == reference(target, prompt, params.max_new_tokens)
    assert not engine.has_unfinished() and engine.num_active == 0


class RoundFaultWarper(RequestSamplingWarper):
    """Sampling that raises from the third call of any batch holding a request with max_new_tokens=17, i.e. in that
    request's second speculative round (its prefill and first round sample cleanly)."""

    calls = 0

    def __init__(self, params, device):
        super().__init__(params, device)
        self.poisoned = any(p.max_new_tokens == 17 for p in params)

    def probabilities(self, logits):
        if self.poisoned:
            RoundFaultWarper.calls += 1
            if RoundFaultWarper.calls >= 3:
                raise RuntimeError("injected sampling fault")
        return super().probabilities(logits)


@pytest.mark.parametrize("policy", ["full", "prefix"])
def test_a_request_whose_round_fails_fails_alone(targets, drafts, monkeypatch, policy):
    """Fault injection inside a round: the poisoned request finishes with an error; the healthy streaming requests
    batched with it stream exactly their final tokens, which equal plain generate's, and the engine goes idle."""
    monkeypatch.setattr(engine_module, "RequestSamplingWarper", RoundFaultWarper)
    monkeypatch.setattr(RoundFaultWarper, "calls", 0)
    target = targets["llama"]
    engine = make_engine(target, drafts[("llama", True)], policy)
    streamed = {}

    def callback(request, tokens, text):
        streamed.setdefault(request.request_id, []).extend(tokens)

    healthy = [([1, 2, 3], 12), ([4, 5], 9), ([6], 14)]
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=n), callback=callback) for p, n in healthy]
    poisoned = engine.add_request([7, 8], SamplingParams(max_new_tokens=17), callback=callback)
    while engine.has_unfinished():
        engine.step()
    assert poisoned.finish_reason == "error" and "injected sampling fault" in poisoned.error
    assert RoundFaultWarper.calls >= 3  # the fault did fire in a round
    for request, (prompt, n) in zip(requests, healthy, strict=True):
        assert request.finish_reason == "length"
        assert request.token_ids == streamed[request.request_id] == reference(target, prompt, n)
    assert not engine.has_unfinished() and engine.num_active == 0


def test_trained_drafts_are_accepted_in_batches(targets, drafts):
    """Guards the property test: the trained drafts make multi-token rounds happen inside the engine."""
    engine = make_engine(targets["llama"], drafts[("llama", True)], "full")
    prompts = [torch.randint(0, VOCAB - 1, (5,), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    engine.generate(prompts, SamplingParams(max_new_tokens=30))
    assert engine.stats.tau > 1.5, engine.stats.as_dict()
    assert engine.stats.mean_active_requests > 3


def test_draft_context_matches_single_request_generate(targets, drafts):
    """Greedy rounds of concurrent, staggered requests accept exactly what the same draft accepts alone.

    The draft's batched context (shared layout with holes and compaction) must give each request the context it
    has when decoded alone by `target.generate(assistant_model=draft)`, so every round proposes and accepts alike.
    """
    target, draft = targets["qwen3"], drafts[("qwen3", True)]
    prompts = [[3, 4, 5], [9, 1, 1, 7, 2, 8, 6], [12], [20, 21, 22, 23]]
    solo = []
    for prompt in prompts:
        out = target.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False, assistant_model=draft,
                              return_dict_in_generate=True)
        solo.append(out.speculation_stats)
    for compact_threshold in (0.0, 1.0):
        engine = make_engine(target, draft, "full", compact_threshold=compact_threshold)
        arrivals = [(i, prompt, SamplingParams(max_new_tokens=25)) for i, prompt in enumerate(prompts)]
        for request, alone in zip(run_arrivals(engine, arrivals), solo, strict=True):
            assert request.stats.proposed == alone.proposed
            assert request.stats.accepted == alone.accepted
    assert engine.stats.compactions == 0


def run_checking_every_query(engine, target, arrivals):
    """`run_arrivals`, checking that each verification query sees exactly its own request's tokens.

    A forward hook captures the engine's target passes; the logits of each row's valid queries (anchor + drafted
    prefix) must equal a clean single-sequence forward over that request's tokens. Returns the requests and the
    attention masks of the passes over the cached slots `(R, P)`.
    """
    captured = []

    def hook(module, args, kwargs, output):
        if "logits_to_keep" not in kwargs:  # verification rounds only (prefills keep one logit)
            captured.append((kwargs, output.logits.clone(), [r.request_id for r in engine._rows]))

    handle = target.register_forward_hook(hook, with_kwargs=True)
    try:
        requests = run_arrivals(engine, arrivals)
    finally:
        handle.remove()
    sequences = {r.request_id: r.prompt_token_ids + r.token_ids for r in requests}
    for kwargs, logits, ids in captured:
        mask, input_ids, positions = kwargs["attention_mask"].bool(), kwargs["input_ids"], kwargs["position_ids"]
        width = input_ids.shape[1]
        for row, request_id in enumerate(ids):
            queries = int(mask[row, -width:].sum())
            start = int(positions[row, 0])
            clean_input = sequences[request_id][:start] + input_ids[row, :queries].tolist()
            clean = target(torch.tensor([clean_input])).logits[0, start:]
            torch.testing.assert_close(logits[row, :queries], clean, rtol=1e-4, atol=1e-4)
    return requests, [kwargs["attention_mask"][:, : -kwargs["input_ids"].shape[1]].bool() for kwargs, _, _ in captured]


def test_holes_are_never_attended(targets, drafts):
    """Rejected and padded slots stay in the KV cache as masked holes and never influence a later query.

    The requests accept different numbers of drafted tokens, so holes pile up (never compacted, then compacted
    whenever the fullest row has any); every query of every round must still match a clean forward.
    """
    target, draft = targets["llama"], drafts[("llama", True)]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12, 13]]
    arrivals = [(i, p, SamplingParams(max_new_tokens=16)) for i, p in enumerate(prompts)]
    widths = {}
    for compact_threshold in (1.0, 0.0):
        engine = make_engine(target, draft, "full", compact_threshold=compact_threshold)
        _, masks = run_checking_every_query(engine, target, arrivals)
        saw_holes = any(bool((mask.long().diff(dim=1) < 0).any()) for mask in masks)  # a masked slot after a used one
        assert saw_holes and len(masks) > 5
        assert (engine.stats.compactions > 0) == (compact_threshold == 0.0)
        widths[compact_threshold] = sum(mask.shape[1] for mask in masks)
    assert widths[0.0] < widths[1.0]


def test_verification_budget_falls_with_load(targets, drafts):
    """Algorithm 1 verifies fewer drafted tokens per request as concurrency grows (paper Fig. 8)."""
    target, draft = targets["llama"], drafts[("llama", True)]
    budgets = []
    for concurrency in (1, 16):
        engine = make_engine(target, draft, "prefix")
        prompts = [[s % 30, (3 * s) % 30, 7] for s in range(concurrency)]
        engine.generate(prompts, SamplingParams(max_new_tokens=12))
        budgets.append(engine.stats.mean_verification_budget)
    assert budgets[1] < budgets[0], budgets


def test_drafting_is_skipped_when_it_cannot_pay(targets, drafts):
    """With a draft pass far slower than a target forward, Algorithm 1 drafts only to probe, and outputs stay exact."""
    target, draft = targets["llama"], drafts[("llama", True)]
    table = LOAD_TABLE.with_draft_cost([1], [10.0])
    engine = DSparkEngine(target, draft, scheduler=PrefixSchedulerPolicy(table, layout="padded", probe_interval=4))
    prompts = [[s % 30, (3 * s) % 30, 7] for s in range(3)]
    requests = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    for request, prompt in zip(requests, prompts, strict=True):
        assert request.token_ids == reference(target, prompt, 20)
    stats = engine.stats
    # The first round drafts (nothing known), then probes after 4, 8, 16, ... skipped rounds.
    expected_passes, interval, skipped = 1, 4, 0
    for _ in range(stats.draft_passes + stats.skipped_drafts - 1):
        if skipped == interval:
            expected_passes, interval, skipped = expected_passes + 1, 2 * interval, 0
        else:
            skipped += 1
    assert stats.skipped_drafts >= 8 and stats.draft_passes == expected_passes, stats
    cheap = DSparkEngine(target, draft, scheduler="prefix", cost_table=LOAD_TABLE.with_draft_cost([1], [1e-6]))
    cheap.generate(prompts, SamplingParams(max_new_tokens=20))
    assert cheap.stats.skipped_drafts == 0


def test_engine_schedules_with_a_profiled_shaped_cost_table(targets, drafts):
    """A table profiled in the engine's own shapes (R rows × width) drives Algorithm 1 end to end; outputs stay exact."""
    target, draft = targets["llama"], drafts[("llama", True)]
    widths = range(1, draft.config.block_size + 2)
    table = profile_verify_cost(target, (1, 3), widths, context_length=8, repeats=1, warmup=0).with_draft_cost(
        *profile_draft_cost(draft, (1, 3), context_length=8, repeats=1, warmup=0)
    )
    assert table.requests == [1, 3] and table.batch_tokens == list(widths)
    engine = DSparkEngine(target, draft, scheduler="prefix", cost_table=table)
    prompts = [[s % 30, (3 * s) % 30, 7] for s in range(3)]
    requests = engine.generate(prompts, SamplingParams(max_new_tokens=16))
    for request, prompt in zip(requests, prompts, strict=True):
        assert request.token_ids == reference(target, prompt, 16)
    assert engine.stats.rounds > 0


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: each request's output is distributed exactly as the target's
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_setup():
    return make_sampling_setup()


def sample_pairs(target, draft, prompt, runs, params, concurrency=256, layout="packed"):
    """(t2, t3) frequencies of `runs` copies of the prompt decoded together by one engine under Algorithm 1.

    SPS(B) = 1/(1 + B/concurrency) makes the scheduler admit a token only when its survival beats ~τ/B, so at this
    load it verifies 0, 1 or 2 tokens depending on the drafted tokens' confidences (packed: per request; padded: the
    width of the whole batch).
    """
    sizes = [1, 64, 128, 256, 384, 512, 768, 1024]
    table = CostTable(sizes, [1.0 / (1 + b / concurrency) for b in sizes])
    policy = PrefixSchedulerPolicy(table, layout=layout)
    engine = DSparkEngine(target, draft, scheduler=policy, max_batch_size=concurrency)
    requests = engine.generate([prompt[0]] * runs, params)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for request in requests:
        counts[request.token_ids[1], request.token_ids[2]] += 1
    proposed = torch.tensor([p for r in requests for p in r.stats.proposed])
    return counts / runs, torch.bincount(proposed, minlength=3)


@pytest.mark.parametrize(
    ("params", "layout", "concurrency", "draft_vocabulary"),
    [
        (SamplingParams(max_new_tokens=4, do_sample=True), "packed", 256, None),
        (SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.8, top_k=6, top_p=0.9), "packed", 256, None),
        (SamplingParams(max_new_tokens=4, do_sample=True), "padded", 8, None),
        (SamplingParams(max_new_tokens=4, do_sample=True), "packed", 256, [0, 2, 3, 5, 6]),
    ],
    ids=["plain", "warped", "padded", "draft_vocab"],
)
def test_sampling_matches_target_distribution(sampling_setup, params, layout, concurrency, draft_vocabulary):
    """20k requests: TV(empirical, exact) of (t2, t3) stays within the bound derived from the sample size.

    t1 comes from the prefill, t2 (and t3 when accepted) from the first speculative round, verified by Algorithm 1.
    With a draft vocabulary, tokens 1, 4 and 7 are never drafted and reach the output only through the residual.
    """
    target, draft, prompt = sampling_setup
    if draft_vocabulary is not None:
        draft = copy.deepcopy(draft).set_draft_vocabulary(draft_vocabulary).attach(target)
    greedy = torch.tensor(False)
    warp = lambda logits: warp_logits(  # noqa: E731
        logits, greedy, torch.tensor(params.temperature), torch.tensor(params.top_k), torch.tensor(params.top_p)
    ).double()
    exact = exact_two_token_distribution(target, prompt, warp)
    torch.manual_seed(0)
    runs = 20_000
    empirical, proposed = sample_pairs(target, draft, prompt, runs, params, concurrency, layout)
    assert (proposed > runs // 20).all(), proposed  # the scheduler really chose 0, 1 and 2 tokens
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < tv_bound(exact, runs), (tv, tv_bound(exact, runs))


def test_biased_drafting_is_detected(sampling_setup, monkeypatch):
    """The same statistic fails when drafted tokens are the argmax instead of samples of their reported logits."""
    target, draft, prompt = sampling_setup

    def argmax_sample_block(*args, **kwargs):
        return original(*args, **{**kwargs, "do_sample": False})

    original = speculative_module.sample_block
    monkeypatch.setattr(speculative_module, "sample_block", argmax_sample_block)
    exact = exact_two_token_distribution(target, prompt)
    torch.manual_seed(0)
    runs = 5_000  # the bias (TV ≈ 0.23) is far above even this smaller sample's bound (≈ 0.09)
    empirical, _ = sample_pairs(target, draft, prompt, runs, SamplingParams(max_new_tokens=4, do_sample=True))
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv > tv_bound(exact, runs), (tv, tv_bound(exact, runs))


def test_draw_tokens_takes_the_argmax_of_greedy_rows_and_samples_the_others():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    greedy = torch.tensor([True, False, True])
    torch.manual_seed(0)
    draws = torch.stack([draw_tokens(probs, greedy) for _ in range(400)])
    assert (draws[:, 0] == 1).all() and (draws[:, 2] == 2).all()
    counts = torch.bincount(draws[:, 1], minlength=3)
    assert counts[1] == 0 and 150 < counts[0] < 250  # Binomial(400, 0.5): 5 standard deviations is ±50
    state = torch.get_rng_state()
    assert draw_tokens(probs[[0, 2]], greedy[[0, 2]]).tolist() == [1, 2]
    assert torch.equal(state, torch.get_rng_state())  # all-greedy rows draw no random numbers

def test_warp_logits_matches_transformers_warpers():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    settings_ = [(0.7, 5, 0.9), (1.3, 0, 0.5), (1.0, 10, 1.0), (0.5, 0, 1.0), (1.0, 3, 0.2), (2.0, 50, 0.99)]
    for row, (temperature, top_k, top_p) in enumerate(settings_):
        processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
        expected = processors(None, logits[row : row + 1].clone())[0]
        got = warp_logits(
            logits[row], torch.tensor(False), torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p)
        )
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    greedy = warp_logits(logits, torch.tensor(True), torch.tensor(1.0), torch.tensor(0), torch.tensor(1.0))
    assert torch.equal(torch.softmax(greedy, -1), torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


# ----------------------------------------------------------------------------------------------------------------------
# Requests: streaming, stops, cancellation, validation
# ----------------------------------------------------------------------------------------------------------------------


def test_streaming_callbacks_receive_exactly_the_output(targets, drafts):
    target, draft, tokenizer = targets["llama"], drafts[("llama", True)], char_tokenizer()
    engine = make_engine(target, draft, "prefix", tokenizer=tokenizer)
    torch.manual_seed(0)
    calls = {}

    def callback(request, tokens, text):
        assert not calls.get(request.request_id, [(None, None, False)])[-1][2]  # nothing after the final call
        calls.setdefault(request.request_id, []).append((tokens, text, request.finished))

    requests = [
        engine.add_request([i + 1, i + 2], SamplingParams(max_new_tokens=10 + 3 * i, do_sample=i % 2 == 1), callback=callback)
        for i in range(4)
    ]
    while engine.has_unfinished():
        engine.step()
    for request in requests:
        chunks = calls[request.request_id]
        assert [t for tokens, _, _ in chunks for t in tokens] == request.token_ids
        assert "".join(text for _, text, _ in chunks) == request.text == tokenizer.decode(request.token_ids, skip_special_tokens=True)
        assert chunks[-1][2] and not any(done for _, _, done in chunks[:-1])
        assert request.wait(0) and request.tokens_per_second > 0
    assert any(len(tokens) > 1 for chunks in calls.values() for tokens, _, _ in chunks)  # multi-token rounds streamed


def test_stop_token_ids(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", True)]
    prompt = [7, 8, 9]
    plain = reference(target, prompt, 30)
    stop = plain[10]
    first = plain.index(stop)
    engine = make_engine(target, draft, "full", tokenizer=char_tokenizer())
    (request,) = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))
    assert request.token_ids == plain[: first + 1] and request.finish_reason == "stop"
    assert request.text == char_tokenizer().decode(plain[:first])
    assert request.token_ids == reference(target, prompt, 30, eos_token_id=stop, pad_token_id=0)


def test_stop_strings_cut_text_and_tokens(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", True)]
    tokenizer = char_tokenizer()
    prompt = [2, 9, 4]
    plain = reference(target, prompt, 30)
    text = tokenizer.decode(plain)
    stop = text[12:14]
    index = text.index(stop)
    engine = make_engine(target, draft, "full", tokenizer=tokenizer)
    streamed = []
    request = engine.add_request(prompt, SamplingParams(max_new_tokens=30, stop=[stop, "never!"]),
                                 callback=lambda r, tokens, delta: streamed.append(delta))
    while engine.has_unfinished():
        engine.step()
    assert request.finish_reason == "stop" and request.text == text[:index] == "".join(streamed)
    assert request.token_ids == plain[: index + len(stop)]  # one character per token: ends where the stop completes


def test_cancellation(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", True)]
    engine = make_engine(target, draft, "prefix", max_batch_size=2)
    finals = {}
    callback = lambda request, tokens, text: finals.__setitem__(request.request_id, request.finished)  # noqa: E731
    keep = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=20), callback=callback)
    running = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=20), callback=callback)
    waiting = engine.add_request([7, 8, 9], SamplingParams(max_new_tokens=20), callback=callback)
    engine.step()
    engine.step()
    assert engine.cancel(running.request_id) and engine.cancel(waiting.request_id)
    assert not engine.cancel(running.request_id) and not engine.cancel("unknown")
    finished = engine.step()
    assert {r.request_id for r in finished} >= {running.request_id, waiting.request_id}
    assert running.finish_reason == waiting.finish_reason == "cancelled" and waiting.token_ids == []
    assert 0 < len(running.token_ids) < 20 and running.token_ids == reference(target, [4, 5, 6], 20)[: len(running.token_ids)]
    assert finals[running.request_id] and finals[waiting.request_id]
    while engine.has_unfinished():
        engine.step()
    assert keep.token_ids == reference(target, [1, 2, 3], 20) and not engine.cancel(keep.request_id)


def test_background_loop_serves_requests_from_other_threads(targets, drafts, monkeypatch):
    import threading
    import time

    releases = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: releases.append(time.perf_counter()))
    target, draft = targets["llama"], drafts[("llama", True)]
    engine = make_engine(target, draft, "lagged")
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        time.sleep(0.2)
        assert releases == []  # idle from the start: nothing to hand back
        requests = [engine.add_request([i, i + 1], SamplingParams(max_new_tokens=12)) for i in range(3)]
        assert all(r.wait(timeout=60) for r in requests)
        time.sleep(0.3)
        released = len(releases)
        assert released >= 1  # once the batch drained, its memory went back to the OS
        time.sleep(0.3)
        assert len(releases) == released  # and not again and again while idle
    finally:
        stop.set()
        engine.wake()
        loop.join(timeout=10)
    assert not loop.is_alive()
    assert [r.token_ids for r in requests] == [reference(target, [i, i + 1], 12) for i in range(3)]


def test_release_free_memory_trims_the_heap_on_glibc():
    import platform

    released = engine_module.release_free_memory()
    assert released is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_engine_stats(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", True)]
    engine = make_engine(target, draft, "full")
    requests = engine.generate([[1, 2], [3, 4, 5]], SamplingParams(max_new_tokens=10))
    stats = engine.stats
    assert stats.generated_tokens == 20 and stats.finished_requests == 2 and stats.prefills == 1
    assert stats.request_rounds == sum(r.stats.num_rounds for r in requests)
    assert stats.verified_draft_tokens == sum(sum(r.stats.proposed) for r in requests)
    assert stats.target_tokens == stats.request_rounds + stats.verified_draft_tokens <= stats.padded_target_tokens
    assert stats.tokens_per_second > 0 and 0 < stats.mean_verification_budget <= 6
    assert set(stats.as_dict()) >= {"tokens_per_second", "mean_verification_budget", "rounds", "tau"}


def test_invalid_input_is_refused(targets, drafts):
    target, draft = targets["llama"], drafts[("llama", True)]
    for kwargs, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(stop=[""]), "stop strings"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
    engine = DSparkEngine(target, draft)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([VOCAB])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text")
    engine.add_request([1], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([2], request_id="a")
    with pytest.raises(ValueError, match="not lossless"):
        DSparkEngine(target, draft, scheduler=GlobalSearchPolicy(LOAD_TABLE))
    with pytest.raises(ValueError, match="needs a draft"):
        DSparkEngine(target, None, scheduler="full")
    with pytest.raises(ValueError, match="cost table"):
        DSparkEngine(target, draft, scheduler="prefix")
    with pytest.raises(ValueError, match="confidence head"):
        DSparkEngine(target, new_draft(target, confidence_head=False), scheduler="threshold", threshold=0.5)
    with pytest.raises(ValueError, match="max_batch_size"):
        DSparkEngine(target, draft, max_batch_size=0)
    with pytest.raises(ValueError, match="only used with a policy name"):
        DSparkEngine(target, draft, scheduler=StaticThresholdPolicy(0.5), threshold=0.5)


def test_sliding_window_targets_are_checked():
    """Holes must never push a slot out of a sliding window: the engine compacts first (and refuses long requests)."""
    target = make_target("mistral", vocab_size=VOCAB)
    target.config.sliding_window = 24
    draft = briefly_train(new_draft(target, block_size=4), target, steps=60, batch=16)
    engine = DSparkEngine(target, draft, compact_threshold=1.0)
    with pytest.raises(ValueError, match="sliding-window"):
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=20))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    requests, _ = run_checking_every_query(engine, target, [(0, p, SamplingParams(max_new_tokens=16)) for p in prompts])
    assert [r.token_ids for r in requests] == [reference(target, p, 16) for p in prompts]
    assert engine.stats.compactions > 0
