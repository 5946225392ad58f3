"""The SPS cost table, its profilers and its plot."""

import importlib.util
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from dspark_hf.scheduling import (
    CostTable,
    PrefixSchedulerPolicy,
    expected_throughput,
    plot_cost_table,
    profile_cost_table,
    profile_verify_cost,
    survival_probabilities,
)

# ----------------------------------------------------------------------------------------------------------------------
# CostTable
# ----------------------------------------------------------------------------------------------------------------------


def test_cost_table_interpolates_clamps_and_extrapolates():
    table = CostTable([2, 4, 8], [20.0, 10.0, 8.0])
    assert table.sps(2) == 20.0
    assert table.sps(3) == pytest.approx(15.0)
    assert table.sps(6) == pytest.approx(9.0)
    assert table.sps(1) == 20.0  # clamped below the first point
    # Above the last point the step time grows like the last segment: 1/10 → 1/8 over 4 tokens.
    slope = (1 / 8 - 1 / 10) / 4
    assert table.sps(12) == pytest.approx(1 / (1 / 8 + 4 * slope))
    assert CostTable([4], [5.0]).sps(100) == 5.0
    # A rising last segment must not make larger batches faster.
    assert CostTable([1, 2], [5.0, 6.0]).sps(10) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        table.sps(0)


@pytest.mark.parametrize(
    "batch_tokens, values",
    [
        ([], []),
        ([1, 2], [1.0, 0.0]),
        ([1, 2], [1.0, -3.0]),
        ([1, 2], [1.0, float("nan")]),
        ([1, 2], [1.0, float("inf")]),
        ([2, 1], [1.0, 2.0]),
        ([1, 1], [1.0, 2.0]),
        ([0, 1], [1.0, 2.0]),
        ([1, 2, 3], [1.0, 2.0]),
    ],
)
def test_cost_table_rejects_bad_input(batch_tokens, values):
    with pytest.raises(ValueError):
        CostTable(batch_tokens, values)


def test_cost_table_rejects_bad_options():
    with pytest.raises(ValueError):
        CostTable([1, 2], [2.0, 1.0], smooth="spline")
    with pytest.raises(ValueError):
        CostTable([1, 2], [[2.0, 1.0]], context_lengths=[64, 128])
    with pytest.raises(ValueError):
        CostTable([1, 2], [[2.0, 1.0], [2.0, 1.0]], context_lengths=[128, 64])


def test_monotone_smoothing_is_isotonic_regression():
    raw = [10.0, 8.0, 9.0, 5.0, 6.0, 7.0, 1.0]
    table = CostTable(list(range(1, 8)), raw, smooth="monotone")
    assert table.steps_per_second == pytest.approx([10.0, 8.5, 8.5, 6.0, 6.0, 6.0, 1.0])
    assert table.raw_rows[0] == raw
    assert CostTable(list(range(1, 8)), raw).steps_per_second == raw
    # Already non-increasing curves are left alone.
    assert CostTable([1, 2, 3], [3.0, 2.0, 2.0], smooth="monotone").steps_per_second == [3.0, 2.0, 2.0]


@given(st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=1, max_size=12))
@settings(max_examples=150, deadline=None)
def test_monotone_smoothing_properties(values):
    smoothed = CostTable(list(range(1, len(values) + 1)), values, smooth="monotone").steps_per_second
    assert all(b <= a + 1e-9 for a, b in zip(smoothed, smoothed[1:], strict=False))
    assert sum(smoothed) == pytest.approx(sum(values))  # PAV preserves the mean


def test_cost_table_json_round_trip(tmp_path):
    table = CostTable(
        [1, 2, 4], [30.0, 31.0, 20.0], smooth="monotone", metadata={"device": "cpu", "shape": "1xB"}
    )
    again = CostTable.from_json(table.to_json())
    assert again.batch_tokens == [1, 2, 4]
    assert again.raw_rows == table.raw_rows and again.steps_per_second == table.steps_per_second
    assert again.smooth == "monotone" and again.metadata == {"device": "cpu", "shape": "1xB"}
    path = tmp_path / "cost_table.json"
    table.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "dspark_hf.cost_table" and data["steps_per_second"] == [30.0, 31.0, 20.0]
    assert CostTable.load(path).sps(3) == pytest.approx(table.sps(3))

    bucketed = CostTable([1, 8], [[10.0, 5.0], [8.0, 2.0]], context_lengths=[128, 1024])
    again = CostTable.from_json(bucketed.to_json())
    assert again.context_lengths == [128, 1024] and again.steps_per_second == [[10.0, 5.0], [8.0, 2.0]]
    with pytest.raises(ValueError):
        CostTable.from_json(json.dumps({"format": "something-else"}))


def test_cost_table_draft_cost():
    table = CostTable([1, 4], [10.0, 5.0]).with_draft_cost([1, 4], [0.01, 0.04])
    assert table.has_draft_cost and not CostTable([1, 4], [10.0, 5.0]).has_draft_cost
    assert table.draft_time(0) == 0.0 and table.draft_time(1) == pytest.approx(0.01)
    assert table.draft_time(2) == pytest.approx(0.02)  # interpolated
    assert table.draft_time(8) == pytest.approx(0.08)  # extrapolated through the last two points
    assert table.round_seconds(4, drafted_requests=2) == pytest.approx(1 / 5.0 + 0.02)
    assert table.round_seconds(4) == pytest.approx(1 / 5.0)
    again = CostTable.from_json(table.to_json())
    assert again.draft_requests == [1, 4] and again.draft_seconds == [0.01, 0.04]
    assert again.for_context(100).draft_time(2) == pytest.approx(0.02)
    assert "draft_seconds" not in json.loads(CostTable([1], [1.0]).to_json())
    for kwargs in (
        {"draft_requests": [1, 2]},
        {"draft_requests": [1, 2], "draft_seconds": [0.1]},
        {"draft_requests": [1, 2], "draft_seconds": [0.1, -1.0]},
        {"draft_requests": [2, 1], "draft_seconds": [0.1, 0.2]},
    ):
        with pytest.raises(ValueError):
            CostTable([1], [1.0], **kwargs)


def test_cost_table_context_buckets():
    table = CostTable([1, 8], [[10.0, 5.0], [8.0, 2.0]], context_lengths=[128, 1024])
    assert table.sps(8) == 5.0  # no context length: first bucket
    assert table.sps(8, context_length=100) == 5.0
    assert table.sps(8, context_length=128) == 5.0
    assert table.sps(8, context_length=129) == 2.0  # first bucket at or above
    assert table.sps(8, context_length=5000) == 2.0  # past the end: longest bucket
    assert table.for_context(500).steps_per_second == [8.0, 2.0]


def test_cost_table_requests_axis():
    # Widths 1 and 5; one request: 40 ms → 50 ms, four requests: 50 ms → 100 ms per forward.
    table = CostTable([1, 5], [[25.0, 20.0], [20.0, 10.0]], requests=[1, 4])
    assert table.sps(5, requests=1) == pytest.approx(20.0)  # one row of 5 tokens
    assert table.sps(20, requests=4) == pytest.approx(10.0)  # four rows of 5 tokens
    assert table.sps(4, requests=4) == pytest.approx(20.0)  # four rows of 1 token
    assert table.sps(3, requests=1) == pytest.approx(22.5)  # width interpolated within the row
    # Between profiled R the step time is interpolated: R = 2 at width 5 → 50 + (100 − 50) / 3 ms.
    assert 1 / table.sps(10, requests=2) == pytest.approx(0.05 + 0.05 / 3)
    # Past the largest R it is extrapolated linearly; below the smallest, clamped.
    assert 1 / table.sps(35, requests=7) == pytest.approx(0.1 + 0.05)
    assert table.round_seconds(5, drafted_requests=0, requests=1) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="requests="):
        table.sps(5)
    with pytest.raises(ValueError, match="not both"):
        CostTable([1], [[1.0]], context_lengths=[8], requests=[1])
    with pytest.raises(ValueError, match="2 requests but 1 rows"):
        CostTable([1], [[1.0]], requests=[1, 2])
    # Round trips keep the axis, with and without a draft cost; smoothing applies per row.
    priced = table.with_draft_cost([1, 4], [0.01, 0.02])
    again = CostTable.from_json(priced.to_json())
    assert again.requests == [1, 4] and again.steps_per_second == [[25.0, 20.0], [20.0, 10.0]]
    assert again.round_seconds(20, drafted_requests=4, requests=4) == pytest.approx(0.1 + 0.02)
    assert again.for_context(512) is again and "requests=[1, 4]" in repr(again)
    assert CostTable([1, 2], [[10.0, 11.0]], requests=[1], smooth="monotone").steps_per_second == [[10.5, 10.5]]


def test_requests_axis_prices_the_engine_shape():
    """SmolLM2 on this CPU, one request, with the rows of the committed tables: the table by token count
    (`cost_table_smollm2_cpu_engine_v8k.json`, profiled as B requests of one token) prices a 5-token verification at
    57 ms, the engine-shaped one (`cost_table_smollm2_cpu_engine_rxw.json`) at 48 ms. Only the shaped one sees what
    the engine measured, that verifying the whole block beats plain decoding at R = 1."""
    confidences = [[0.25, 0.35, 0.4, 0.4]]  # τ of the full block ≈ 1.39, as measured
    survival = survival_probabilities(confidences)
    by_count = CostTable([1, 2, 4, 8], [24.66, 23.87, 18.82, 13.53]).with_draft_cost([1], [0.00485])
    shaped = CostTable([1, 2, 3, 4, 5], [[24.39, 22.68, 22.47, 21.88, 20.75]], requests=[1]).with_draft_cost(
        [1], [0.00574]
    )
    for table, full_block_pays in ((by_count, False), (shaped, True)):
        plain = 1 / table.round_seconds(1, requests=1)
        assert (expected_throughput(survival, [4], table, "padded") > plain) is full_block_pays
        policy = PrefixSchedulerPolicy(table, layout="padded")
        policy.select_lengths(confidences, request_ids=["a"])
        assert policy.should_draft(["a"], [4])  # ℓ = 1 pays under both tables
    # Θ for ℓ = 1..4 under the shaped table: 25.1, 26.6, 26.7, 25.7 tokens/s; by count: 26.7, 25.9, 23.7, 22.4.
    assert PrefixSchedulerPolicy(shaped, layout="padded").select_lengths(confidences) == [3]
    assert PrefixSchedulerPolicy(by_count, layout="padded").select_lengths(confidences) == [1]


# ----------------------------------------------------------------------------------------------------------------------
# Profiler
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("shape", ["1xB", "Bx1"])
def test_profile_cost_table_on_tiny_llama(tiny_llama, shape):
    seen = []

    def record(module, args, kwargs):
        seen.append((tuple(kwargs["input_ids"].shape), kwargs["cache"].get_seq_length()))

    tiny_llama.train()
    handle = tiny_llama.register_forward_pre_hook(record, with_kwargs=True)
    try:
        table = profile_cost_table(
            tiny_llama, batch_sizes=(4, 1, 2), context_length=12, repeats=3, warmup=1, shape=shape
        )
    finally:
        handle.remove()
    assert table.batch_tokens == [1, 2, 4]
    assert all(math.isfinite(v) and v > 0 for v in table.steps_per_second)
    assert table.metadata["shape"] == shape and table.metadata["context_lengths"] == [12]
    # One prefill, then (warmup + repeats) forwards per size, each on top of exactly the prefilled context.
    assert seen[0] == ((1, 12), 0)
    timed = seen[1:]
    assert len(timed) == 4 * 3
    assert all(length == 12 for _, length in timed)
    expected_shapes = {(1, b) for b in (1, 2, 4)} if shape == "1xB" else {(b, 1) for b in (1, 2, 4)}
    assert {shape_ for shape_, _ in timed} == expected_shapes
    assert tiny_llama.training  # the profiler switches to eval mode and restores the caller's mode


def test_profile_verify_cost_on_tiny_llama(tiny_llama):
    seen = []

    def record(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append((tuple(kwargs["input_ids"].shape), kwargs["cache"].get_seq_length(), mask))

    handle = tiny_llama.register_forward_pre_hook(record, with_kwargs=True)
    try:
        table = profile_verify_cost(tiny_llama, num_requests=(3, 1), widths=(2, 1), context_length=6, repeats=2, warmup=0)
    finally:
        handle.remove()
    assert table.requests == [1, 3] and table.batch_tokens == [1, 2] and table.metadata["shape"] == "RxW"
    assert all(math.isfinite(v) and v > 0 for row in table.steps_per_second for v in row)
    timed = seen[1:]  # after the prefill, every shape twice on top of the 6 cached tokens
    assert sorted({shape for shape, _, _ in timed}) == [(1, 1), (1, 2), (3, 1), (3, 2)] and len(timed) == 8
    assert all(length == 6 for _, length, _ in timed)
    # The engine's mask: cache and new tokens, with a hole in slot 0 of every row.
    for (rows, width), _, mask in timed:
        assert mask.shape == (rows, 6 + width) and mask[:, 0].eq(0).all() and mask[:, 1:].eq(1).all()
    with pytest.raises(ValueError, match="repeats"):
        profile_verify_cost(tiny_llama, repeats=0)


def test_profile_cost_table_context_buckets(tiny_llama):
    table = profile_cost_table(tiny_llama, batch_sizes=(1, 2), context_length=(16, 8), repeats=2, warmup=0)
    assert table.context_lengths == [8, 16]
    assert all(v > 0 for row in table.steps_per_second for v in row)
    with pytest.raises(ValueError):
        profile_cost_table(tiny_llama, batch_sizes=(1,), shape="2x2")


# ----------------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_cost_table(tmp_path):
    tables = {
        "1xB": CostTable([1, 2, 4], [20.0, 19.0, 21.0], smooth="monotone"),
        "Bx1": CostTable([1, 2, 4], [[20.0, 15.0, 10.0], [10.0, 8.0, 5.0]], context_lengths=[64, 256]),
    }
    plot_cost_table(tables, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").read_bytes()[:4] == b"\x89PNG"
