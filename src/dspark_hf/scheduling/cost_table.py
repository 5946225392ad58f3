"""The SPS cost table of a verifier: target forwards per second SPS(B) at B tokens, optionally per context-length
bucket or per number of requests, and the time of one draft pass d(R)."""

import bisect
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from ..serialization import JsonFileMixin, parse_document

COST_TABLE_FORMAT = "dspark_hf.cost_table"
COST_TABLE_VERSION = 1
SMOOTHING_MODES = ("none", "monotone")


def _non_increasing_fit(values: list[float]) -> list[float]:
    """Least-squares non-increasing fit (pool adjacent violators)."""
    blocks: list[tuple[float, int]] = []
    for value in values:
        blocks.append((value, 1))
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (mean2, n2), (mean1, n1) = blocks.pop(), blocks.pop()
            blocks.append(((mean1 * n1 + mean2 * n2) / (n1 + n2), n1 + n2))
    return [mean for mean, count in blocks for _ in range(count)]


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) through the points: clamped below the first x, extrapolated above the last through the
    last two points with the slope floored at 0 (a one-point curve stays constant)."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    if x >= xs[-1]:
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ys[-1] + slope * (x - xs[-1])
    i = bisect.bisect_right(xs, x)
    weight = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + weight * (ys[i] - ys[i - 1])


def strictly_increasing_ints(values: Sequence[int], name: str) -> list[int]:
    """`values` as ints, checked to be positive and strictly increasing (`name` names them in errors)."""
    values = [int(v) for v in values]
    if not values:
        raise ValueError(f"`{name}` is empty: a cost table needs at least one profiled point.")
    if values[0] < 1:
        raise ValueError(f"`{name}` must be positive, got {values}.")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`{name}` must be strictly increasing (sorted, no duplicates), got {values}.")
    return values


class CostTable(JsonFileMixin):
    """Target forward steps per second, SPS(B), for a verification forward of B tokens (paper §3.2.2).

    Between profiled batch sizes SPS is interpolated linearly. Below the smallest profiled B it is clamped to the
    first value. Above the largest, the step time 1/SPS is extrapolated linearly through the last two points
    (slope floored at 0, so SPS never rises; a one-point table stays constant): profile past the largest B you
    schedule. Optionally the table holds one row per context-length bucket, or one row per number of requests.

    A forward's cost depends on its shape and attention path, not only on B (on a 2-core CPU, SmolLM2's 8 new
    tokens take 44 ms as one request and 70 ms as 8 unmasked requests of one). A table with `requests` describes a
    padded batch of R rows of w tokens each (the shape `DSparkEngine` verifies, see `profile_verify_cost`):
    `batch_tokens` then lists the profiled widths w and row i holds SPS at `requests[i]` rows. A lookup of B tokens
    over R requests reads width B / R; between profiled R the step time is interpolated linearly (clamped below,
    extrapolated above).

    Args:
        batch_tokens: profiled batch sizes B (tokens in one target forward), strictly increasing, ≥ 1.
        steps_per_second: SPS at each B; a list of rows, one per context length, when `context_lengths` is given.
        context_lengths: optional context-length buckets, strictly increasing. A lookup at context length L uses
            the first bucket ≥ L (the longest one past the end); a lookup without a context length uses the first.
        requests: optional numbers of requests R, strictly increasing, one row of `steps_per_second` each; then
            `batch_tokens` are tokens per request (see above) and lookups need `requests=`. Not combinable with
            `context_lengths`.
        smooth: `"none"` keeps the measurements; `"monotone"` replaces each row by its least-squares non-increasing
            fit (isotonic regression), so the cost of a forward never falls as B grows.
        metadata: free-form JSON-serialisable description (device, dtype, shape, model, ...).
        draft_requests: optional numbers of requests R at which one draft pass was timed, strictly increasing.
        draft_seconds: seconds of one draft pass (backbone, sequential head, confidences) at each R; interpolated
            linearly, clamped below and extrapolated linearly above (see `profile_draft_cost`). Without them the
            draft pass is taken to be free, as in the paper.
    """

    def __init__(
        self,
        batch_tokens: Sequence[int],
        steps_per_second: Sequence[float] | Sequence[Sequence[float]],
        context_lengths: Sequence[int] | None = None,
        smooth: Literal["none", "monotone"] = "none",
        metadata: dict[str, Any] | None = None,
        draft_requests: Sequence[int] | None = None,
        draft_seconds: Sequence[float] | None = None,
        requests: Sequence[int] | None = None,
    ):
        if smooth not in SMOOTHING_MODES:
            raise ValueError(f"`smooth` must be one of {SMOOTHING_MODES}, got {smooth!r}.")
        if context_lengths is not None and requests is not None:
            raise ValueError(
                "A cost table has rows per context length or per number of requests, not both: profile one table "
                "per context length with `requests`, or drop `requests`."
            )
        self.batch_tokens = strictly_increasing_ints(batch_tokens, "batch_tokens")
        self.context_lengths = None
        self.requests = None
        raw_rows = [steps_per_second]
        for name, keys in (("context_lengths", context_lengths), ("requests", requests)):
            if keys is None:
                continue
            setattr(self, name, strictly_increasing_ints(keys, name))
            raw_rows = list(steps_per_second)
            if len(raw_rows) != len(keys):
                raise ValueError(f"{len(keys)} {name} but {len(raw_rows)} rows of steps_per_second.")
        self.raw_rows: list[list[float]] = []
        for row in raw_rows:
            row = [float(v) for v in row]
            if len(row) != len(self.batch_tokens):
                raise ValueError(
                    f"{len(self.batch_tokens)} batch sizes but {len(row)} steps_per_second values."
                )
            if not all(math.isfinite(v) and v > 0 for v in row):
                raise ValueError(f"steps_per_second values must be finite and positive, got {row}.")
            self.raw_rows.append(row)
        self.smooth = smooth
        self.rows = [_non_increasing_fit(row) if smooth == "monotone" else list(row) for row in self.raw_rows]
        self.metadata = dict(metadata or {})
        if (draft_requests is None) != (draft_seconds is None):
            raise ValueError("Give both `draft_requests` and `draft_seconds` (one draft-pass time per R), or neither.")
        self.draft_requests = None if draft_requests is None else strictly_increasing_ints(draft_requests, "draft_requests")
        self.draft_seconds = None
        if draft_seconds is not None:
            self.draft_seconds = [float(v) for v in draft_seconds]
            if len(self.draft_seconds) != len(self.draft_requests):
                raise ValueError(
                    f"{len(self.draft_requests)} draft_requests but {len(self.draft_seconds)} draft_seconds."
                )
            if not all(math.isfinite(v) and v >= 0 for v in self.draft_seconds):
                raise ValueError(f"draft_seconds must be finite and non-negative, got {self.draft_seconds}.")

    @property
    def has_draft_cost(self) -> bool:
        """Whether the table holds the draft pass time d(R)."""
        return self.draft_seconds is not None

    def _shaped(self, rows: list[list[float]]) -> list[float] | list[list[float]]:
        """`rows` shaped like the constructor's `steps_per_second`: one list without context or requests axis."""
        return rows[0] if self.context_lengths is None and self.requests is None else rows

    @property
    def steps_per_second(self) -> list[float] | list[list[float]]:
        """The (smoothed) values, shaped like the constructor's `steps_per_second`."""
        return self._shaped(self.rows)

    def _bucket(self, context_length: int | None) -> int:
        if context_length is None or self.context_lengths is None:
            return 0
        return min(bisect.bisect_left(self.context_lengths, context_length), len(self.rows) - 1)

    def _row_sps(self, row: list[float], batch_tokens: float) -> float:
        """SPS of one row: linear in SPS up to the last profiled B, linear in step time 1/SPS past it."""
        if len(row) == 1 or batch_tokens < self.batch_tokens[-1]:
            return _interpolate(self.batch_tokens, row, batch_tokens)
        return 1.0 / _interpolate(self.batch_tokens, [1.0 / v for v in row], batch_tokens)

    def sps(self, batch_tokens: float, context_length: int | None = None, requests: int | None = None) -> float:
        """SPS at `batch_tokens` tokens per forward, over `requests` requests for a table with a requests axis (see
        the class docstring for interpolation and extrapolation)."""
        if not batch_tokens >= 1:
            raise ValueError(
                f"A verification forward holds at least one token, got batch_tokens={batch_tokens}."
            )
        if self.requests is None:
            return self._row_sps(self.rows[self._bucket(context_length)], batch_tokens)
        if requests is None or requests < 1:
            raise ValueError(
                f"This cost table has one row per number of requests {self.requests}: pass `requests=` (>= 1), got "
                f"{requests}."
            )
        width = max(batch_tokens / requests, 1.0)
        step_times = [1.0 / self._row_sps(row, width) for row in self.rows]
        return 1.0 / _interpolate(self.requests, step_times, requests)

    def draft_time(self, num_requests: int) -> float:
        """Seconds of one draft pass over `num_requests` requests (0 when the table has no draft cost or R = 0)."""
        if self.draft_seconds is None or num_requests <= 0:
            return 0.0
        return _interpolate(self.draft_requests, self.draft_seconds, num_requests)

    def round_seconds(
        self,
        batch_tokens: float,
        drafted_requests: int = 0,
        context_length: int | None = None,
        requests: int | None = None,
    ) -> float:
        """Time of one round: a verification forward of `batch_tokens` tokens (over `requests` requests, needed by a
        table with a requests axis) plus a draft pass over `drafted_requests` requests (0: no draft pass)."""
        return 1.0 / self.sps(batch_tokens, context_length, requests) + self.draft_time(drafted_requests)

    def with_draft_cost(self, draft_requests: Sequence[int], draft_seconds: Sequence[float]) -> "CostTable":
        """A copy of this table that also holds the draft pass time d(R) (see `profile_draft_cost`)."""
        return CostTable(
            self.batch_tokens,
            self.steps_per_second_raw,
            context_lengths=self.context_lengths,
            smooth=self.smooth,
            metadata=self.metadata,
            draft_requests=draft_requests,
            draft_seconds=draft_seconds,
            requests=self.requests,
        )

    @property
    def steps_per_second_raw(self) -> list[float] | list[list[float]]:
        """The measurements before smoothing, shaped like the constructor's `steps_per_second`."""
        return self._shaped(self.raw_rows)

    def for_context(self, context_length: int) -> "CostTable":
        """A single-row table holding the bucket that `sps(..., context_length)` would use (a table with a requests
        axis has no context buckets and is returned unchanged)."""
        if self.requests is not None:
            return self
        return CostTable(
            self.batch_tokens,
            self.raw_rows[self._bucket(context_length)],
            smooth=self.smooth,
            metadata=self.metadata,
            draft_requests=self.draft_requests,
            draft_seconds=self.draft_seconds,
        )

    def to_json(self) -> str:
        """JSON text (see docs/scheduling.md); raw measurements are stored, smoothing is re-applied on load."""
        data = {
            "format": COST_TABLE_FORMAT,
            "version": COST_TABLE_VERSION,
            "batch_tokens": self.batch_tokens,
            "steps_per_second": self.steps_per_second_raw,
            "smooth": self.smooth,
            "metadata": self.metadata,
        }
        if self.context_lengths is not None:
            data["context_lengths"] = self.context_lengths
        if self.requests is not None:
            data["requests"] = self.requests
        if self.draft_seconds is not None:
            data["draft_requests"] = self.draft_requests
            data["draft_seconds"] = self.draft_seconds
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CostTable":
        """Inverse of `to_json`."""
        data = parse_document(text, COST_TABLE_FORMAT, COST_TABLE_VERSION)
        return cls(
            data["batch_tokens"],
            data["steps_per_second"],
            context_lengths=data.get("context_lengths"),
            smooth=data.get("smooth", "none"),
            metadata=data.get("metadata"),
            draft_requests=data.get("draft_requests"),
            draft_seconds=data.get("draft_seconds"),
            requests=data.get("requests"),
        )

    def __repr__(self) -> str:
        buckets = "" if self.context_lengths is None else f", context_lengths={self.context_lengths}"
        buckets += "" if self.requests is None else f", requests={self.requests}"
        draft = "" if self.draft_seconds is None else f", draft_requests={self.draft_requests}, draft_seconds={self.draft_seconds}"
        return (
            f"CostTable(batch_tokens={self.batch_tokens}, steps_per_second={self.steps_per_second}{buckets}, "
            f"smooth={self.smooth!r}{draft})"
        )

