"""Survival probabilities, the expected throughput Θ of a choice of verification lengths, and the searches over
lengths: the admission path of Algorithm 1 (with or without its early stop) and an exhaustive search."""

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch

from .cost_table import CostTable

LAYOUTS = ("packed", "padded")
MAX_BRUTE_FORCE_CANDIDATES = 1_000_000

Confidences = Sequence[Sequence[float]] | torch.Tensor


def confidence_rows(confidences: Confidences) -> list[list[float]]:
    """`confidences` (ragged rows or an `(R, γ)` tensor) as lists of floats, checked to be probabilities."""
    if isinstance(confidences, torch.Tensor):
        if confidences.dim() != 2:
            raise ValueError(
                f"A confidence tensor must be (requests, positions), got shape {tuple(confidences.shape)}."
            )
        rows = confidences.detach().to("cpu", torch.float64).tolist()
    else:
        rows = [[float(c) for c in row] for row in confidences]
    for r, row in enumerate(rows):
        for j, c in enumerate(row):
            if not 0.0 <= c <= 1.0:  # also rejects NaN
                raise ValueError(f"confidences[{r}][{j}] = {c} is not a probability in [0, 1].")
    return rows


def length_caps(rows: list[list[float]], max_lengths: Sequence[int] | None) -> list[int]:
    """Per-request cap on ℓ_r: the drafted block's length, lowered to `max_lengths[r]` when given."""
    if max_lengths is None:
        return [len(row) for row in rows]
    if len(max_lengths) != len(rows):
        raise ValueError(f"{len(rows)} requests but {len(max_lengths)} max_lengths.")
    if any(int(m) < 0 for m in max_lengths):
        raise ValueError(f"max_lengths must be non-negative, got {list(max_lengths)}.")
    return [min(int(m), len(row)) for m, row in zip(max_lengths, rows, strict=True)]


def prefix_survival(row: Sequence[float]) -> list[float]:
    """Survival a_k = ∏_{i≤k} c_i of one request's conditional confidences c_1..c_γ."""
    return list(itertools.accumulate(row, lambda a, c: a * c))


def survival_probabilities(confidences: Confidences) -> list[list[float]]:
    """Prefix survival a_{r,k} = ∏_{i≤k} c_{r,i} of every request (Algorithm 1, line 2)."""
    return [prefix_survival(row) for row in confidence_rows(confidences)]


def check_layout(layout: str) -> None:
    """Raises unless `layout` is one of `LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")


def _verified_tokens(lengths: Sequence[int], layout: str) -> int:
    """Tokens one verification forward computes: Σ_r (1 + ℓ_r) packed, R · (1 + max_r ℓ_r) padded."""
    if layout == "padded":
        return len(lengths) * (1 + max(lengths, default=0))
    return len(lengths) + sum(lengths)


def expected_throughput(
    survival: Sequence[Sequence[float]],
    lengths: Sequence[int],
    cost_table: CostTable,
    layout: Literal["packed", "padded"] = "packed",
    drafted: bool = True,
) -> float:
    """Θ = τ / (1/SPS(B) + d(R)) with τ = Σ_r (1 + Σ_{k≤ℓ_r} a_{r,k}) and B the verified tokens of `layout`.

    d(R) is the table's draft pass time (0 without one, which gives the paper's Θ = τ · SPS(B)); `drafted=False`
    leaves it out (a round that does not draft).
    """
    check_layout(layout)
    if len(lengths) != len(survival):
        raise ValueError(f"{len(survival)} requests but {len(lengths)} lengths.")
    if any(not 0 <= length <= len(row) for length, row in zip(lengths, survival, strict=True)):
        raise ValueError(f"lengths {list(lengths)} exceed the drafted blocks.")
    expected = sum(1.0 + sum(row[:length]) for row, length in zip(survival, lengths, strict=True))
    drafted_requests = len(survival) if drafted else 0
    return expected / cost_table.round_seconds(
        _verified_tokens(lengths, layout), drafted_requests, requests=len(lengths)
    )


def ranked_candidates(survival: list[list[float]], caps: list[int]) -> list[tuple[float, int, int]]:
    """Candidates (a, k, r) with a > 0 and k ≤ cap, best first.

    Ties in a are broken by position k, then request r. Survival never rises along a block, so request r's
    position k always precedes its position k + 1: every prefix of the ranking is a set of per-request prefixes.
    """
    candidates = [
        (a, k, r)
        for r, (row, cap) in enumerate(zip(survival, caps, strict=True))
        for k, a in enumerate(row[:cap], start=1)
        if a > 0
    ]
    return sorted(candidates, key=lambda item: (-item[0], item[1], item[2]))


def lengths_from_ranking(ranked: list[tuple[float, int, int]], num_requests: int, count: int) -> list[int]:
    """Lengths that admit the first `count` candidates of `ranked` (see `ranked_candidates`)."""
    lengths = [0] * num_requests
    for _, k, r in ranked[:count]:
        lengths[r] = k
    return lengths


def greedy_lengths(
    survival: list[list[float]],
    caps: list[int],
    cost_table: CostTable,
    early_stop: bool,
    layout: Literal["packed", "padded"] = "packed",
) -> list[int]:
    """Walks the admission path of Algorithm 1; with `early_stop` it breaks at the first admission that does not
    strictly raise Θ, without it returns the (earliest) argmax of Θ over the whole path.

    Packed, the path admits one candidate (r, k) at a time in survival order. Padded, the extra tokens of a width
    are computed for every request anyway, so the path widens the batch one position at a time and admits every
    request's next position at once; the event ℓ_r ≥ k then depends on survivals up to position k, never on x_{r,k}.
    """
    num_requests = len(survival)
    if num_requests == 0:
        return []

    def theta(expected: float, batch_tokens: int) -> float:
        return expected / cost_table.round_seconds(batch_tokens, num_requests, requests=num_requests)

    if layout == "padded":
        expected, best_theta, best_width = float(num_requests), theta(num_requests, num_requests), 0
        for width in range(1, max(caps, default=0) + 1):
            expected += sum(row[width - 1] for row, cap in zip(survival, caps, strict=True) if cap >= width)
            current = theta(expected, num_requests * (1 + width))
            if current > best_theta:
                best_theta, best_width = current, width
            elif early_stop:
                break
        return [min(best_width, cap) for cap in caps]
    ranked = ranked_candidates(survival, caps)
    batch, expected = num_requests, float(num_requests)
    best_theta, best_count = theta(expected, batch), 0
    for count, (a, _, _) in enumerate(ranked, start=1):
        batch += 1
        expected += a
        current = theta(expected, batch)
        if current > best_theta:
            best_theta, best_count = current, count
        elif early_stop:
            break
    return lengths_from_ranking(ranked, num_requests, best_count)


def brute_force_best_lengths(
    survival: Sequence[Sequence[float]],
    cost_table: CostTable,
    max_lengths: Sequence[int] | None = None,
    layout: Literal["packed", "padded"] = "packed",
) -> list[int]:
    """Exhaustive argmax of Θ over every (ℓ_1, ..., ℓ_R), first in lexicographic order on ties (tests, diagnostics).

    Uses the same tokens as the schedulers would see, but it is a retrospective search: not lossless.
    """
    rows = [[float(a) for a in row] for row in survival]
    caps = length_caps(rows, max_lengths)
    if math.prod(cap + 1 for cap in caps) > MAX_BRUTE_FORCE_CANDIDATES:
        raise ValueError(f"Exhaustive search over caps {caps} is too large.")
    best_lengths, best_theta = [0] * len(rows), -math.inf
    for lengths in itertools.product(*(range(cap + 1) for cap in caps)):
        theta = expected_throughput(rows, lengths, cost_table, layout)
        if theta > best_theta:
            best_lengths, best_theta = list(lengths), theta
    return best_lengths
