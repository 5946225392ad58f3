"""Survival, throughput, Algorithm 1 and the other verification policies, losslessness and the Appendix A
counterexample."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark_hf.scheduling import (
    CostTable,
    FullBlockPolicy,
    GlobalSearchPolicy,
    LaggedSchedulerPolicy,
    NoSpeculationPolicy,
    PrefixSchedulerPolicy,
    StaticThresholdPolicy,
    appendix_a_cost_table,
    appendix_a_simulation,
    brute_force_best_lengths,
    expected_throughput,
    make_policy,
    schedule_verification_lengths,
    survival_probabilities,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------------

probability = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
positive_probability = st.floats(min_value=0.01, max_value=1.0, allow_nan=False)


def confidence_rows(element=probability, max_requests=3, max_gamma=4):
    return st.lists(st.lists(element, min_size=0, max_size=max_gamma), min_size=1, max_size=max_requests)


@st.composite
def smooth_tables(draw, max_batch: int) -> CostTable:
    """Every integer B in 1..max_batch, either SPS concave decreasing or step time convex increasing.

    With survival increments sorted descending, τ is concave along the admission path, so Θ = τ·SPS is
    log-concave in the first case and τ/time is quasi-concave in the second: Θ is unimodal along the path.
    """
    linear = draw(st.floats(min_value=0.0, max_value=0.5))
    quadratic = draw(st.floats(min_value=0.0, max_value=0.05))
    batches = list(range(1, max_batch + 1))
    if draw(st.booleans()):
        top = 1.0 + linear * (max_batch - 1) + quadratic * (max_batch - 1) ** 2
        values = [top - linear * (b - 1) - quadratic * (b - 1) ** 2 for b in batches]
    else:
        values = [1.0 / (1.0 + linear * (b - 1) + quadratic * (b - 1) ** 2) for b in batches]
    return CostTable(batches, values)


@st.composite
def jagged_monotone_tables(draw, max_batch: int) -> CostTable:
    """Arbitrary non-increasing SPS curves with cliffs and plateaus."""
    drops = draw(
        st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.3]), min_size=max_batch, max_size=max_batch)
    )
    values, value = [], 1.0
    for drop in drops:
        value *= 1.0 - drop
        values.append(value)
    return CostTable(list(range(1, max_batch + 1)), values)


def theta(confidences, lengths, table):
    return expected_throughput(survival_probabilities(confidences), lengths, table)


def best_theta(confidences, table):
    survival = survival_probabilities(confidences)
    return expected_throughput(survival, brute_force_best_lengths(survival, table), table)


def max_batch_for(rows):
    return sum(1 + len(row) for row in rows)


# ----------------------------------------------------------------------------------------------------------------------
# Algorithm 1
# ----------------------------------------------------------------------------------------------------------------------


@given(data=st.data(), rows=confidence_rows())
@FAST
def test_prefix_scheduler_reaches_brute_force_optimum_when_theta_is_unimodal(data, rows):
    table = data.draw(smooth_tables(max_batch_for(rows)))
    lengths = PrefixSchedulerPolicy(table).select_lengths(rows)
    assert theta(rows, lengths, table) == pytest.approx(best_theta(rows, table), rel=1e-9)


@given(data=st.data(), rows=confidence_rows())
@FAST
def test_global_search_reaches_brute_force_optimum_on_any_monotone_curve(data, rows):
    table = data.draw(jagged_monotone_tables(max_batch_for(rows)))
    lengths = GlobalSearchPolicy(table).select_lengths(rows)
    assert theta(rows, lengths, table) == pytest.approx(best_theta(rows, table), rel=1e-9)
    # The early-stopping scheduler is never better than the global search.
    prefix = PrefixSchedulerPolicy(table).select_lengths(rows)
    assert theta(rows, prefix, table) <= theta(rows, lengths, table) + 1e-12


@st.composite
def with_draft_cost(draw, table: CostTable) -> CostTable:
    """The table, half the time with a constant draft pass time (a constant keeps Θ unimodal along the path)."""
    if draw(st.booleans()):
        return table
    seconds = draw(st.floats(min_value=0.0, max_value=5.0))
    return table.with_draft_cost([1], [seconds])


@given(data=st.data(), rows=confidence_rows(max_gamma=4))
@FAST
def test_padded_prefix_scheduler_reaches_brute_force_optimum_when_theta_is_unimodal(data, rows):
    max_batch = len(rows) * (1 + max(len(row) for row in rows))
    table = data.draw(smooth_tables(max_batch).flatmap(with_draft_cost))
    lengths = PrefixSchedulerPolicy(table, layout="padded").select_lengths(rows)
    survival = survival_probabilities(rows)
    best = brute_force_best_lengths(survival, table, layout="padded")
    reached = expected_throughput(survival, lengths, table, "padded")
    assert reached == pytest.approx(expected_throughput(survival, best, table, "padded"), rel=1e-9)


def test_padded_layout_costs_the_widest_request_and_fills_every_row():
    # R = 2, SPS by tokens: 2 → 10, 4 → 8, 6 → 4. Survivals r0 = [0.9, 0.81], r1 = [0.5, 0.25].
    rows = [[0.9, 0.9], [0.5, 0.5]]
    table = CostTable([2, 4, 6], [10.0, 8.0, 4.0])
    # Width 1 (4 tokens): Θ = (2 + 0.9 + 0.5)·8 = 27.2 > 20; width 2 (6 tokens): (3.4 + 0.81 + 0.25)·4 = 17.84.
    assert PrefixSchedulerPolicy(table, layout="padded").select_lengths(rows) == [1, 1]
    assert expected_throughput(survival_probabilities(rows), [1, 0], table, "padded") == pytest.approx(2.9 * 8)
    assert expected_throughput(survival_probabilities(rows), [1, 0], table) == pytest.approx(2.9 * 9)  # packed: B = 3
    # Caps are respected while the batch widens.
    assert PrefixSchedulerPolicy(table, layout="padded").select_lengths(rows, max_lengths=[1, 0]) == [1, 0]
    with pytest.raises(ValueError, match="layout"):
        PrefixSchedulerPolicy(table, layout="ragged")


def test_draft_cost_enters_theta_and_favours_longer_verification():
    # One request, SPS 10 at B = 1, 5 at B = 2; survival 0.9. Free draft: Θ0 = 10 > Θ1 = 1.9·5 = 9.5.
    table = CostTable([1, 2], [10.0, 5.0])
    assert PrefixSchedulerPolicy(table).select_lengths([[0.9]]) == [0]
    # A 0.1 s draft pass is paid either way: Θ0 = 1/0.2 = 5 < Θ1 = 1.9/0.3 = 6.33.
    costly = table.with_draft_cost([1], [0.1])
    assert PrefixSchedulerPolicy(costly).select_lengths([[0.9]]) == [1]
    assert expected_throughput([[0.9]], [1], costly) == pytest.approx(1.9 / 0.3)
    assert expected_throughput([[0.9]], [0], costly, drafted=False) == pytest.approx(10.0)


def test_should_draft_skips_and_probes_with_backoff():
    table = CostTable([1, 2, 3, 4, 5], [10.0, 9.5, 9.0, 8.5, 8.0])
    ids = ["a", "b"]
    assert PrefixSchedulerPolicy(table).should_draft(ids, [4, 4])  # no draft cost: always draft
    cheap = PrefixSchedulerPolicy(table.with_draft_cost([1], [0.001]), layout="padded")
    costly = PrefixSchedulerPolicy(
        table.with_draft_cost([1], [1.0]), layout="padded", probe_interval=2, max_probe_interval=4
    )
    for policy in (cheap, costly):
        assert policy.should_draft(ids, [4, 4])  # nothing known yet: draft to learn
        policy.select_lengths([[0.9, 0.8], [0.9, 0.8]], request_ids=ids)
    assert cheap.should_draft(ids, [4, 4])
    # A 1 s draft pass can never pay for 0.9 + 0.72 expected tokens per request: skip. A new request "c" is
    # predicted from the recent rows of all requests.
    decisions = [costly.should_draft(["a", "c"] if i == 0 else ids, [4, 4]) for i in range(12)]
    # Probes after 2 skipped steps, then after 4 (doubled, capped at max_probe_interval), then after 4 again.
    assert decisions == [False, False, True, False, False, False, False, True, False, False, False, False]
    costly.forget(ids)
    assert costly.should_draft(ids, [4, 4])  # the 4th skip in a row: probe; forgotten requests start from all requests' rows
    assert not costly.should_draft(ids, [4, 4])
    costly.reset()
    assert costly.should_draft(["a"], [4])  # nothing known after a reset
    with pytest.raises(ValueError, match="probe_interval"):
        PrefixSchedulerPolicy(table, probe_interval=8, max_probe_interval=4)


def test_should_draft_averages_steps_and_shrinks_towards_all_requests():
    """One unlucky step does not stop drafting: a request's prediction is its mean survival over its last
    `prediction_window` steps, shrunk towards the mean over all requests' recent steps (`prior_weight`)."""
    # SPS 10 at one token, 9 at two; a 10 ms draft pass. Drafting one token with survival a pays iff
    # (1 + a) / (1/9 + 0.01) > 10, i.e. a > 0.211.
    table = CostTable([1, 2], [10.0, 9.0]).with_draft_cost([1], [0.01])
    last_only = PrefixSchedulerPolicy(table, layout="padded", prediction_window=1, prior_weight=0)
    windowed = PrefixSchedulerPolicy(table, layout="padded", prediction_window=4, prior_weight=0)
    shrunk = PrefixSchedulerPolicy(table, layout="padded", prediction_window=1, prior_weight=4)
    for policy in (last_only, windowed, shrunk):
        for confidence in (0.9, 0.9, 0.9, 0.05):  # mean 0.6875, last 0.05
            assert policy.should_draft(["a"], [1])
            policy.select_lengths([[confidence]], request_ids=["a"])
    assert not last_only.should_draft(["a"], [1])
    assert windowed.predicted_survival("a") == pytest.approx([0.6875])
    assert windowed.should_draft(["a"], [1])
    assert shrunk.predicted_survival("a") == pytest.approx([(0.05 + 4 * 0.6875) / 5])
    assert shrunk.should_draft(["a"], [1])
    # A request that never drafted starts from the population; without shrinkage it has no prediction.
    assert shrunk.predicted_survival("new") == pytest.approx([0.6875])
    assert windowed.predicted_survival("new") == []
    # Survival is averaged per position over the steps that reach it, then made non-increasing.
    windowed.select_lengths([[0.5, 1.0]], request_ids=["a"])
    assert windowed.predicted_survival("a") == pytest.approx([(0.9 + 0.9 + 0.05 + 0.5) / 4, 0.5])
    windowed.select_lengths([[0.2, 1.0]], request_ids=["a"])
    assert windowed.predicted_survival("a") == pytest.approx([(0.9 + 0.05 + 0.5 + 0.2) / 4, 0.35])
    windowed.reset()
    assert windowed.predicted_survival("a") == [] and windowed.should_draft(["a"], [1])
    for kwargs in ({"prediction_window": 0}, {"population_window": 0}, {"prior_weight": -1.0}):
        with pytest.raises(ValueError):
            PrefixSchedulerPolicy(table, **kwargs)


# Θ along the path of [0.9, 0.9, 0.9]: 1.0, 1.9·0.6 = 1.14, 2.71·0.4 = 1.084, 3.439·0.39 = 1.341.
STOP_TABLE = CostTable([1, 2, 3, 4], [1.0, 0.6, 0.4, 0.39])


def test_prefix_scheduler_stops_at_first_non_improving_admission():
    rows = [[0.9, 0.9, 0.9]]
    assert PrefixSchedulerPolicy(STOP_TABLE).select_lengths(rows) == [1]
    assert GlobalSearchPolicy(STOP_TABLE).select_lengths(rows) == [3]
    assert brute_force_best_lengths(survival_probabilities(rows), STOP_TABLE) == [3]


def test_prefix_scheduler_breaks_on_equal_throughput():
    # Θ0 = 1·2 = 2, Θ1 = (1 + 1)·1 = 2: not a strict improvement, so nothing is admitted.
    table = CostTable([1, 2, 3], [2.0, 1.0, 1.0])
    assert PrefixSchedulerPolicy(table).select_lengths([[1.0, 1.0]]) == [0]
    assert PrefixSchedulerPolicy(table).select_lengths([[1.0, 1.0]], max_lengths=[5]) == [0]


def test_prefix_scheduler_with_several_requests_counts_every_request_in_batch():
    # R = 2, B starts at 2. Survivals: r0 = [0.9, 0.45], r1 = [0.8, 0.08]; ranking 0.9, 0.8, 0.45, 0.08.
    rows = [[0.9, 0.5], [0.8, 0.1]]
    table = CostTable([2, 3, 4, 5, 6], [10.0, 9.0, 8.0, 5.0, 4.0])
    # Θ: 2·10 = 20, 2.9·9 = 26.1, 3.7·8 = 29.6, 4.15·5 = 20.75 → stop with (1, 1).
    assert PrefixSchedulerPolicy(table).select_lengths(rows) == [1, 1]
    assert theta(rows, [1, 1], table) == pytest.approx(3.7 * 8)


def test_ties_are_broken_deterministically_in_prefix_order():
    table = CostTable([1, 2, 3, 4, 5, 6, 7], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    # Two requests, B = 2 + k after k admissions: Θ_k = (2 + k)(6 − k) = 12, 15, 16, 15 → two admissions; the
    # equal survivals 1.0 go by position first: (r0, 1), (r1, 1).
    assert PrefixSchedulerPolicy(table).select_lengths([[1.0, 1.0], [1.0, 1.0]]) == [1, 1]
    # Within a request equal survivals are admitted in prefix order: a length, never a hole.
    assert GlobalSearchPolicy(CostTable([1], [1.0])).select_lengths([[1.0, 1.0, 1.0]]) == [3]
    # Across requests at equal position, the lower request index goes first.
    table3 = CostTable([2, 3, 4], [1.0, 0.9, 0.5])  # Θ: 2, 2.5·0.9 = 2.25, 3·0.5 = 1.5 → one admission
    assert PrefixSchedulerPolicy(table3).select_lengths([[0.5], [0.5]]) == [1, 0]


def test_empty_candidates():
    table = CostTable([1, 8], [10.0, 9.0])
    for policy in [
        PrefixSchedulerPolicy(table),
        GlobalSearchPolicy(table),
        LaggedSchedulerPolicy(table, lag=1),
    ]:
        assert policy.select_lengths([]) == []
        assert policy.select_lengths([[]]) == [0]  # γ = 0
        assert policy.select_lengths([[0.0, 0.9], [0.0]]) == [0, 0]  # zero survival is never a candidate
        assert policy.select_lengths(torch.zeros(2, 0)) == [0, 0]
    assert FullBlockPolicy().select_lengths([[], [0.3]]) == [0, 1]


def test_max_lengths_cap_every_policy():
    table = CostTable([1, 16], [10.0, 9.9])
    rows = [[0.99] * 5, [0.99] * 5]
    caps = [2, 0]
    assert PrefixSchedulerPolicy(table).select_lengths(rows) == [5, 5]
    assert PrefixSchedulerPolicy(table).select_lengths(rows, max_lengths=caps) == [2, 0]
    assert GlobalSearchPolicy(table).select_lengths(rows, max_lengths=caps) == [2, 0]
    assert FullBlockPolicy().select_lengths(rows, max_lengths=caps) == [2, 0]
    assert FullBlockPolicy().select_lengths(rows, max_lengths=[9, 9]) == [5, 5]
    assert StaticThresholdPolicy(0.5).select_lengths(rows, max_lengths=caps) == [2, 0]
    assert LaggedSchedulerPolicy(table, lag=1, cold_start_length=10).select_lengths(
        rows, max_lengths=caps
    ) == [2, 0]
    with pytest.raises(ValueError):
        FullBlockPolicy().select_lengths(rows, max_lengths=[1])
    with pytest.raises(ValueError):
        FullBlockPolicy().select_lengths(rows, max_lengths=[1, -1])


def test_invalid_confidences_are_rejected():
    with pytest.raises(ValueError):
        FullBlockPolicy().select_lengths([[0.5, 1.5]])
    with pytest.raises(ValueError):
        FullBlockPolicy().select_lengths([[float("nan")]])
    with pytest.raises(ValueError):
        FullBlockPolicy().select_lengths(torch.ones(3))


def test_tensor_and_list_inputs_agree():
    torch.manual_seed(0)
    confidences = torch.rand(4, 6)
    table = CostTable([1, 4, 8, 16, 32], [30.0, 27.0, 22.0, 14.0, 8.0])
    policy = PrefixSchedulerPolicy(table)
    assert policy.select_lengths(confidences) == policy.select_lengths(confidences.tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Other policies and the entry point
# ----------------------------------------------------------------------------------------------------------------------


def test_static_threshold_uses_conditional_confidence_by_default():
    rows = [[0.9, 0.8, 0.95, 0.2, 0.99], [0.3, 0.9]]
    assert StaticThresholdPolicy(0.7).select_lengths(rows) == [3, 0]
    # Threshold 0 is full-block verification (paper Fig. 5), and "falls below" is strict.
    assert StaticThresholdPolicy(0.0).select_lengths(rows) == [5, 2]
    assert StaticThresholdPolicy(0.0).select_lengths([[0.0, 0.5]]) == [2]
    assert StaticThresholdPolicy(0.7).select_lengths([[0.7, 0.7, 0.69]]) == [2]
    # On survival: 0.9, 0.72, 0.684, ... → stops before 0.684.
    assert StaticThresholdPolicy(0.7, on="survival").select_lengths(rows) == [2, 0]
    with pytest.raises(ValueError):
        StaticThresholdPolicy(1.5)


def test_no_speculation_and_full_block():
    rows = [[0.1, 0.2], [0.9]]
    assert NoSpeculationPolicy().select_lengths(rows) == [0, 0]
    assert FullBlockPolicy().select_lengths(rows) == [2, 1]


def test_lagged_policy_uses_stale_budget_and_current_ranking():
    table = CostTable([1, 2, 3, 4], [1.0, 0.6, 0.4, 0.39])  # global search on [0.9]*3 admits 3 tokens
    policy = LaggedSchedulerPolicy(table, lag=2)
    assert policy.budget([7]) == 0  # cold request, cold_start_length=0
    assert policy.select_lengths([[0.9, 0.9, 0.9]], request_ids=[7]) == [0]
    assert policy.select_lengths([[0.1, 0.1, 0.1]], request_ids=[7]) == [0]
    # Budget from two calls ago ([0.9]*3 → 3 tokens), although the current confidences would not pay.
    assert policy.budget([7]) == 3
    assert policy.select_lengths([[0.2, 0.1, 0.1]], request_ids=[7]) == [3]
    # Budget from [0.1]*3: Θ0 = 1 beats every admission.
    assert policy.select_lengths([[0.9, 0.9, 0.9]], request_ids=[7]) == [0]
    # Several requests: the stale budget is shared out by the current global ranking.
    policy = LaggedSchedulerPolicy(CostTable([1, 8], [10.0, 9.9]), lag=1)
    policy.observe(["a", "b"], [[0.9, 0.9], [0.9, 0.9]])
    assert policy.budget(["a", "b"]) == 4
    assert policy.select_lengths([[0.99, 0.99, 0.99], [0.5, 0.5, 0.5]], request_ids=["a", "b"]) == [3, 1]
    policy.forget(["a"])
    assert policy.budget(["a", "b"]) == 3  # "a" is cold again, "b" contributes its 3 stale tokens
    policy.reset()
    assert policy.budget(["b"]) == 0
    with pytest.raises(ValueError):
        LaggedSchedulerPolicy(table, lag=0)
    with pytest.raises(ValueError):
        policy.select_lengths([[0.5], [0.5]], request_ids=["x", "x"])


def test_schedule_verification_lengths_entry_point():
    table = CostTable([1, 2, 4, 8], [27.0, 24.0, 17.6, 15.0])
    rows = [[0.9, 0.8, 0.3, 0.1]]
    assert schedule_verification_lengths(rows, table) == [2]
    assert schedule_verification_lengths(rows, table, policy="full") == [4]
    assert schedule_verification_lengths(rows, policy="none") == [0]
    assert schedule_verification_lengths(rows, policy="threshold", threshold=0.5) == [2]
    assert schedule_verification_lengths(rows, table, policy=GlobalSearchPolicy(table), max_lengths=[1]) == [
        1
    ]
    with pytest.raises(ValueError):
        schedule_verification_lengths(rows, policy="prefix")  # no cost table
    with pytest.raises(ValueError):
        schedule_verification_lengths(rows, table, policy="lagged")
    with pytest.raises(ValueError):
        schedule_verification_lengths(rows, table, policy="fastest")
    with pytest.raises(TypeError):
        schedule_verification_lengths(rows, table, policy=FullBlockPolicy(), threshold=0.5)
    assert isinstance(make_policy("lagged", table, lag=3), LaggedSchedulerPolicy)
    assert not make_policy("global", table).lossless and make_policy("prefix", table).lossless


# ----------------------------------------------------------------------------------------------------------------------
# Losslessness: non-anticipation, and the Appendix A counterexample
# ----------------------------------------------------------------------------------------------------------------------


@given(
    data=st.data(),
    rows=confidence_rows(max_requests=3, max_gamma=5).filter(lambda rows: any(rows)),
    policy_name=st.sampled_from(["prefix", "prefix_padded", "lagged", "threshold", "full", "none"]),
)
@FAST
def test_lossless_policies_are_non_anticipating(data, rows, policy_name):
    """Whether ℓ_r ≥ k must not change when everything computed from x_{r,k} (c_{r,k+1}, ...) changes."""
    table = data.draw(jagged_monotone_tables(len(rows) * (1 + max(len(row) for row in rows)) + 1))
    r = data.draw(st.sampled_from([i for i, row in enumerate(rows) if row]))
    k = data.draw(st.integers(min_value=1, max_value=len(rows[r])))
    altered = [list(row) for row in rows]
    altered[r][k:] = data.draw(st.lists(probability, min_size=len(rows[r]) - k, max_size=len(rows[r]) - k))
    history = data.draw(
        confidence_rows(max_requests=len(rows), max_gamma=5).map(lambda h: (h * 3)[: len(rows)])
    )
    kwargs = {"threshold": data.draw(probability)} if policy_name == "threshold" else {}
    if policy_name == "prefix_padded":
        policy_name, kwargs = "prefix", {"layout": "padded"}
        table = data.draw(with_draft_cost(table))
    results = []
    for current in (rows, altered):
        policy = make_policy(policy_name, table, **kwargs)
        if policy_name == "lagged":
            policy.observe(list(range(len(rows))), history)
            policy.observe(list(range(len(rows))), history)
        results.append(policy.select_lengths(current)[r] >= k)
    assert results[0] == results[1]


def test_global_search_is_anticipating():
    """The same check fails for the global search: Appendix A's x_1 decides whether x_1 is admitted."""
    table = appendix_a_cost_table()
    assert GlobalSearchPolicy(table).select_lengths([[0.8, 0.9]]) == [2]  # Θ2 = 2.52 · 0.45 = 1.134 > 1
    assert GlobalSearchPolicy(table).select_lengths([[0.8, 0.0]]) == [0]
    assert PrefixSchedulerPolicy(table).select_lengths([[0.8, 0.9]]) == [0]  # Θ1 = 0.9 < Θ0 = 1: stop
    assert PrefixSchedulerPolicy(table).select_lengths([[0.8, 0.0]]) == [0]


APPENDIX_TRIALS = 40_000


def assert_distribution(frequencies, expected_a, trials=APPENDIX_TRIALS, standard_errors=5.0):
    bound = standard_errors * math.sqrt(expected_a * (1 - expected_a) / trials)  # 5 SE ≈ 0.011 at 40k trials
    assert frequencies.sum().item() == pytest.approx(1.0)
    assert abs(frequencies[0].item() - expected_a) < bound, (frequencies.tolist(), expected_a, bound)


def test_appendix_a_global_search_is_biased():
    assert_distribution(appendix_a_simulation("global", APPENDIX_TRIALS, seed=1), 0.85)


@pytest.mark.parametrize(
    "policy, kwargs",
    [("prefix", {}), ("lagged", {}), ("full", {}), ("none", {}), ("threshold", {"threshold": 0.85})],
)
def test_appendix_a_lossless_policies_recover_target(policy, kwargs):
    assert_distribution(appendix_a_simulation(policy, APPENDIX_TRIALS, seed=2, **kwargs), 0.7)


def test_appendix_a_lagged_policy_admits_sometimes():
    """The lagged run is not trivially lossless: it does speculate, in about half of the rounds (stale x_1 = A)."""
    policy = LaggedSchedulerPolicy(appendix_a_cost_table(), lag=2)
    admitted = []
    for stale in ([0.8, 0.9], [0.8, 0.0]):
        for current in ([0.8, 0.9], [0.8, 0.0]):
            policy.reset()
            policy.select_lengths([stale])
            policy.select_lengths([[0.8, 0.0]])
            admitted.append(policy.select_lengths([current])[0] >= 1)
    assert admitted == [True, True, False, False]
    policy.reset()
    assert_distribution(appendix_a_simulation(policy, APPENDIX_TRIALS, seed=3), 0.7)
