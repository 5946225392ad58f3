"""Verification policies behind one interface: plain decoding, full block, static threshold, the hardware-aware
prefix scheduler (paper Algorithm 1, §3.2.2), the global search and the lagged production variant (§5.2), and
the `schedule_verification_lengths` entry point."""

import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Literal

from .cost_table import CostTable
from .throughput import (
    Confidences,
    check_layout,
    confidence_rows,
    expected_throughput,
    greedy_lengths,
    length_caps,
    lengths_from_ranking,
    prefix_survival,
    ranked_candidates,
)

POLICY_NAMES = ("prefix", "global", "lagged", "threshold", "full", "none")


def _position_sums(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[int]]:
    """Position-wise sum of the survivals of ragged conditional-confidence rows, and how many rows reach each position."""
    sums: list[float] = []
    counts: list[int] = []
    for row in rows:
        for k, a in enumerate(prefix_survival(row)):
            if k == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[k] += a
            counts[k] += 1
    return sums, counts


def _position_means(rows: Sequence[Sequence[float]]) -> list[float]:
    """Position-wise mean survival of ragged conditional-confidence rows, over the rows that reach each position."""
    sums, counts = _position_sums(rows)
    return [total / count for total, count in zip(sums, counts, strict=True)]


class VerificationPolicy(ABC):
    """Chooses how many drafted tokens of each request the target verifies this step.

    One interface for single-request generation (R = 1) and a batched engine (R requests). `lossless` tells
    whether the policy is non-anticipating (ℓ_r ≥ k never depends on the drafted token x_{r,k}); only lossless
    policies keep the output distributed exactly as the target's.
    """

    lossless: bool = True

    def select_lengths(
        self,
        confidences: Confidences,
        max_lengths: Sequence[int] | None = None,
        request_ids: Sequence[Hashable] | None = None,
    ) -> list[int]:
        """Verification lengths ℓ_r, one per request.

        Args:
            confidences: `confidences[r][j]` is the calibrated conditional confidence c_{r,j+1} of request r's
                drafted token j+1 (a list of per-request sequences, possibly ragged, or an `(R, γ)` tensor).
            max_lengths: optional per-request caps (e.g. the room left before `max_length`); ℓ_r ≤ cap.
            request_ids: stable ids of the requests, used only by stateful policies (`LaggedSchedulerPolicy`);
                defaults to positions 0..R-1.
        """
        rows = confidence_rows(confidences)
        return self._select(rows, length_caps(rows, max_lengths), request_ids)

    def should_draft(self, request_ids: Sequence[Hashable], max_lengths: Sequence[int]) -> bool:
        """Whether the next step should draft at all, decided before drafting from earlier steps only (default:
        always). A step that does not draft verifies nothing (ℓ_r = 0), which is lossless."""
        return True

    def forget(self, request_ids: Sequence[Hashable]) -> None:  # noqa: B027 - optional hook, a no-op when stateless
        """Drops what the policy remembers of finished requests (stateless policies remember nothing)."""

    def reset(self) -> None:  # noqa: B027 - optional hook, a no-op when stateless
        """Drops everything the policy remembers, between independent runs."""

    @abstractmethod
    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        """Lengths from validated confidence rows and caps."""


class _HistoryPolicy(VerificationPolicy):
    """A policy that remembers the last `history_length` confidence rows of every request id."""

    def __init__(self, history_length: int):
        self._history_length = history_length
        self._history: dict[Hashable, deque[list[float]]] = {}

    @staticmethod
    def _ids(request_ids: Sequence[Hashable] | None, num_requests: int) -> list[Hashable]:
        ids = list(range(num_requests)) if request_ids is None else list(request_ids)
        if len(set(ids)) != len(ids) or len(ids) != num_requests:
            raise ValueError(f"Need one distinct request id per request, got {ids} for {num_requests} requests.")
        return ids

    def observe(self, request_ids: Sequence[Hashable], confidences: Confidences) -> None:
        """Records one step of confidences for each request."""
        rows = confidence_rows(confidences)
        if len(request_ids) != len(rows):
            raise ValueError(f"{len(rows)} confidence rows but {len(request_ids)} request ids.")
        for request_id, row in zip(request_ids, rows, strict=True):
            self._history.setdefault(request_id, deque(maxlen=self._history_length)).append(row)

    def forget(self, request_ids: Sequence[Hashable]) -> None:
        for request_id in request_ids:
            self._history.pop(request_id, None)

    def reset(self) -> None:
        self._history.clear()


class NoSpeculationPolicy(VerificationPolicy):
    """Verifies nothing (ℓ_r = 0): plain decoding. Lossless trivially."""

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        return [0] * len(confidences)


class FullBlockPolicy(VerificationPolicy):
    """Verifies every drafted token (ℓ_r = γ, or the cap). Lossless: the length is fixed before drafting."""

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        return list(caps)


class StaticThresholdPolicy(VerificationPolicy):
    """Verifies the prefix up to just before the first position whose score falls below `threshold`.

    The score is the conditional confidence c_k (`on="conditional"`, the quantity swept in the paper's Fig. 5;
    threshold 0 is full-block verification) or the survival a_k (`on="survival"`). Lossless: position k is
    admitted from c_1..c_k, which are computed from the tokens before x_k, deciding left to right.
    """

    def __init__(self, threshold: float, on: Literal["conditional", "survival"] = "conditional"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
        if on not in ("conditional", "survival"):
            raise ValueError(f"`on` must be 'conditional' or 'survival', got {on!r}.")
        self.threshold = threshold
        self.on = on

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        lengths = []
        for row, cap in zip(confidences, caps, strict=True):
            scores = row if self.on == "conditional" else prefix_survival(row)
            length = 0
            while length < cap and scores[length] >= self.threshold:
                length += 1
            lengths.append(length)
        return lengths


class PrefixSchedulerPolicy(_HistoryPolicy):
    """Hardware-aware prefix scheduler, Algorithm 1 of the paper.

    Sorts all candidates (r, k) with a_{r,k} > 0 by survival, best first (ties: lower position, then lower
    request index, so a request's positions are always admitted in prefix order), admits them one at a time
    with B = R + admitted and τ* = R + Σ a, and stops at the first admission whose Θ = τ*·SPS(B) does not strictly
    exceed the best so far. The result is the global optimum whenever Θ is unimodal along the path.

    Three extensions, all off unless asked for, adapt it to verifiers unlike the paper's:

    - `layout="padded"`: the target computes R · (1 + max ℓ) tokens (a padded batch, as in `DSparkEngine`), so
      the path widens all requests one position at a time (see `greedy_lengths`).
    - a cost table with a draft pass time d(R) (`CostTable.with_draft_cost`): Θ = τ* / (1/SPS(B) + d(R)), and
      `should_draft` skips drafting when the predicted best Θ of a drafted step does not beat plain decoding's
      R · SPS(R). A request's predicted survival is its mean over its last `prediction_window` drafted steps,
      shrunk towards the mean of the last `population_window` drafted rows of all requests with the weight of
      `prior_weight` steps: a new request starts from the population, and one unlucky step of a request moves
      its prediction only part of the way. After `probe_interval` skipped steps in a row it drafts once to
      refresh the prediction; each probe that still finds drafting unprofitable doubles the wait, up to
      `max_probe_interval`, and a profitable prediction resets it.
    - a cost table with a requests axis (`profile_verify_cost`): each forward is priced in its real shape, R rows
      of 1 + max ℓ tokens, instead of by its token count alone.

    Lossless: the early stop makes the scheduler non-anticipating. Whether (r, k) is admitted depends only on the
    candidates ranked before it, and none of those is computed from x_{r,k} (a_{r,k+1} ≤ a_{r,k} ranks after).
    `should_draft` only reads confidences of earlier steps.
    """

    def __init__(
        self,
        cost_table: CostTable,
        layout: Literal["packed", "padded"] = "packed",
        probe_interval: int = 16,
        max_probe_interval: int = 256,
        prediction_window: int = 8,
        population_window: int = 64,
        prior_weight: float = 4.0,
    ):
        check_layout(layout)
        if not 1 <= probe_interval <= max_probe_interval:
            raise ValueError(
                f"Need 1 <= probe_interval <= max_probe_interval, got {probe_interval} and {max_probe_interval}."
            )
        if prediction_window < 1 or population_window < 1:
            raise ValueError(
                f"`prediction_window` and `population_window` must be >= 1 drafted step, got {prediction_window} and "
                f"{population_window}."
            )
        if not prior_weight >= 0:
            raise ValueError(f"`prior_weight` must be >= 0 (0: no shrinkage), got {prior_weight}.")
        super().__init__(history_length=prediction_window)
        self.prior_weight = float(prior_weight)
        self._population: deque[list[float]] = deque(maxlen=population_window)
        self.cost_table = cost_table
        self.layout = layout
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self._interval = probe_interval
        self._skipped = 0

    def predicted_survival(self, request_id: Hashable) -> list[float]:
        """Predicted survival row of the next drafted step of `request_id`: position-wise, (n·own + w·population) /
        (n + w) with own the mean over the request's n stored steps that reach the position, population the mean over
        the last drafted rows of all requests, w = `prior_weight`; non-increasing. Empty before any drafted step."""
        return self._shrunk_survival(self._history.get(request_id, ()), _position_means(self._population))

    def _shrunk_survival(self, own: Sequence[Sequence[float]], population: list[float]) -> list[float]:
        sums, counts = _position_sums(own)
        survival = []
        for k in range(max(len(sums), len(population))):
            weight = self.prior_weight if k < len(population) else 0.0
            count = counts[k] if k < len(counts) else 0
            if count + weight == 0:
                break
            prior = population[k] if k < len(population) else 0.0
            survival.append(((sums[k] if k < len(sums) else 0.0) + weight * prior) / (count + weight))
        return list(itertools.accumulate(survival, min))

    def should_draft(self, request_ids: Sequence[Hashable], max_lengths: Sequence[int]) -> bool:
        if not self.cost_table.has_draft_cost or not request_ids:
            return True
        if not self._population:
            return True  # nothing drafted yet: draft to learn
        if self._skipped >= self._interval:  # probe, and wait twice as long before the next one
            self._skipped = 0
            self._interval = min(2 * self._interval, self.max_probe_interval)
            return True
        population = _position_means(self._population)
        survival = [self._shrunk_survival(self._history.get(rid, ()), population) for rid in request_ids]
        caps = [min(int(cap), len(row)) for cap, row in zip(max_lengths, survival, strict=True)]
        lengths = greedy_lengths(survival, caps, self.cost_table, early_stop=True, layout=self.layout)
        drafted = expected_throughput(survival, lengths, self.cost_table, self.layout)
        plain = len(request_ids) / self.cost_table.round_seconds(len(request_ids), requests=len(request_ids))
        if drafted > plain:
            self._skipped, self._interval = 0, self.probe_interval
            return True
        self._skipped += 1
        return False

    def reset(self) -> None:
        super().reset()
        self._population.clear()
        self._skipped, self._interval = 0, self.probe_interval

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        if self.cost_table.has_draft_cost:
            self.observe(self._ids(request_ids, len(confidences)), confidences)
            self._population.extend(confidences)
        survival = [prefix_survival(row) for row in confidences]
        return greedy_lengths(survival, caps, self.cost_table, early_stop=True, layout=self.layout)


class GlobalSearchPolicy(VerificationPolicy):
    """Algorithm 1 without the early stop: the argmax of Θ over the whole admission path.

    NOT lossless. It sees a_{r,k+1}, which depends on x_{r,k}, before deciding whether to admit x_{r,k}, so it
    favours tokens followed by confident continuations; Appendix A shows a (0.7, 0.3) target becoming
    (0.85, 0.15) (see `appendix_a_simulation`). Use it for diagnostics only, or behind a causal barrier as in
    `LaggedSchedulerPolicy`.
    """

    lossless = False

    def __init__(self, cost_table: CostTable):
        self.cost_table = cost_table

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        return greedy_lengths(
            [prefix_survival(row) for row in confidences], caps, self.cost_table, early_stop=False
        )


class LaggedSchedulerPolicy(_HistoryPolicy):
    """The production variant of §5.2: a budget from stale confidences, filled by the current ranking.

    Each call (1) computes the budget K, the number of drafted tokens to verify this step, by an unconstrained
    global search (no early stop, robust to jagged SPS curves) over the confidences each request had `lag` calls
    ago, with B counting all current requests; a request with fewer than `lag` past calls adds
    `cold_start_length` tokens instead; (2) admits the K best current candidates by survival (same ranking and
    ties as Algorithm 1, caps respected); (3) records the current confidences.

    History is kept per request id: pass stable `request_ids` to `select_lengths` in a batched engine (positions
    0..R-1 are used otherwise, which suits single-request generation). Call `observe` for steps that draft without
    scheduling, `forget` when requests finish, `reset` between independent runs.

    Lossless: K depends only on confidences from earlier steps, never on this step's tokens, and a current
    candidate's rank depends only on candidates ranked before it, none of which is computed from x_{r,k}.
    """

    def __init__(self, cost_table: CostTable, lag: int = 2, cold_start_length: int = 0):
        if lag < 1:
            raise ValueError(f"`lag` must be >= 1 (lag 0 is the non-lossless global search), got {lag}.")
        if cold_start_length < 0:
            raise ValueError(f"`cold_start_length` must be >= 0, got {cold_start_length}.")
        super().__init__(history_length=lag)
        self.cost_table = cost_table
        self.lag = lag
        self.cold_start_length = cold_start_length

    def budget(self, request_ids: Sequence[Hashable]) -> int:
        """Number of drafted tokens to verify in a step over these requests, from `lag`-step-old confidences."""
        stale = [
            self._history[rid][0] if len(self._history.get(rid, ())) == self.lag else []
            for rid in request_ids
        ]
        cold = sum(len(self._history.get(rid, ())) < self.lag for rid in request_ids)
        survival = [prefix_survival(row) for row in stale]
        lengths = greedy_lengths(survival, [len(row) for row in stale], self.cost_table, early_stop=False)
        return sum(lengths) + cold * self.cold_start_length

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        ids = self._ids(request_ids, len(confidences))
        ranked = ranked_candidates([prefix_survival(row) for row in confidences], caps)
        lengths = lengths_from_ranking(ranked, len(confidences), self.budget(ids))
        self.observe(ids, confidences)
        return lengths


def make_policy(name: str, cost_table: CostTable | None = None, **kwargs) -> VerificationPolicy:
    """Builds a policy by name: `"prefix"`, `"global"`, `"lagged"` (these need `cost_table`), `"threshold"`
    (needs `threshold=`), `"full"` or `"none"`. Extra keyword arguments go to the policy's constructor."""
    if name not in POLICY_NAMES:
        raise ValueError(f"Unknown verification policy {name!r}; choose one of {POLICY_NAMES}.")
    if name in ("prefix", "global", "lagged"):
        if cost_table is None:
            raise ValueError(f"The {name!r} policy needs a cost table (see profile_cost_table).")
        cls = {
            "prefix": PrefixSchedulerPolicy,
            "global": GlobalSearchPolicy,
            "lagged": LaggedSchedulerPolicy,
        }[name]
        return cls(cost_table, **kwargs)
    cls = {"threshold": StaticThresholdPolicy, "full": FullBlockPolicy, "none": NoSpeculationPolicy}[name]
    return cls(**kwargs)


def schedule_verification_lengths(
    confidences: Confidences,
    cost_table: CostTable | None = None,
    policy: str | VerificationPolicy = "prefix",
    max_lengths: Sequence[int] | None = None,
    request_ids: Sequence[Hashable] | None = None,
    **policy_kwargs,
) -> list[int]:
    """How many drafted tokens of each request to verify this step.

    Args:
        confidences: `confidences[r][j]` = calibrated conditional confidence c_{r,j+1} (ragged list or tensor).
        cost_table: SPS(B) table, needed by `"prefix"` (Algorithm 1, the default) and `"global"`.
        policy: a name from `POLICY_NAMES` or a `VerificationPolicy`. `"lagged"` keeps history across steps, so
            it must be passed as one long-lived `LaggedSchedulerPolicy` instance, not by name.
        max_lengths: optional per-request caps.
        request_ids: stable request ids for stateful policies.
        policy_kwargs: constructor arguments when `policy` is a name (e.g. `threshold=0.5`).

    Example:
        >>> table = CostTable([1, 2, 4, 8], [27.0, 24.0, 17.6, 15.0])
        >>> schedule_verification_lengths([[0.9, 0.8, 0.3, 0.1]], table)
        [2]
    """
    if isinstance(policy, str):
        if policy == "lagged":
            raise ValueError(
                "The 'lagged' policy remembers confidences across steps: build LaggedSchedulerPolicy(cost_table) "
                "once and pass the instance as `policy=` at every step."
            )
        policy = make_policy(policy, cost_table, **policy_kwargs)
    elif policy_kwargs:
        raise TypeError(f"policy_kwargs {sorted(policy_kwargs)} are only used when `policy` is a name.")
    return policy.select_lengths(confidences, max_lengths, request_ids)
