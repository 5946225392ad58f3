"""Verification-length scheduling: the SPS cost table and its profiler, the policies behind one interface,
the hardware-aware prefix scheduler (paper Algorithm 1, §3.2.2), its lagged production variant (§5.2) and a
Monte-Carlo reproduction of the Appendix A counterexample.

Vocabulary (paper notation, positions 1-based):

- `confidences[r][j]` is the calibrated *conditional* confidence c_{r,j+1}: the probability that drafted token
  j+1 of request r is accepted given that its prefix was. c_{r,k} is computed from x_{r,k-1}, never from x_{r,k}.
- survival a_{r,k} = ∏_{i≤k} c_{r,i}, the probability that the first k drafted tokens are all accepted.
- A verification length ℓ_r sends the anchor plus ℓ_r drafted tokens of request r to the target, so one forward
  over R requests holds B = Σ_r (1 + ℓ_r) tokens and is expected to yield τ = Σ_r (1 + Σ_{k≤ℓ_r} a_{r,k}) tokens.
- SPS(B) is the number of target forwards per second at B tokens; Θ = τ · SPS(B) is the expected token throughput.
  A cost table may also hold the time of one draft pass over R requests, d(R); Θ then becomes τ / (1/SPS(B) + d(R))
  (an extension for verifiers whose draft pass is not negligible, e.g. on CPU; without it Θ is the paper's).
- Layout: the paper's verifier packs the R requests' tokens (B = Σ_r (1 + ℓ_r)). A padded verifier, like the
  `DSparkEngine` over a transformers KV cache, computes R · (1 + max_r ℓ_r) tokens; `layout="padded"` schedules
  for that cost.

Losslessness: speculative decoding recovers the target distribution exactly only if the event ℓ_r ≥ k is decided
without looking at x_{r,k} (the non-anticipating property). Every policy below states whether it has it.
"""

import bisect
import contextlib
import copy
import itertools
import json
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import LogitsProcessorList

from .. import compat
from ..models.dspark.modeling_dspark import DSparkContextCache, DSparkDraftModel
from ..serialization import JsonFileMixin, parse_document
from ..speculative.round import draft_block
from ..speculative.sampling import RequestSamplingWarper, SamplingParams

COST_TABLE_FORMAT = "dspark_hf.cost_table"
COST_TABLE_VERSION = 1
SMOOTHING_MODES = ("none", "monotone")
LAYOUTS = ("packed", "padded")
POLICY_NAMES = ("prefix", "global", "lagged", "threshold", "full", "none")
MAX_BRUTE_FORCE_CANDIDATES = 1_000_000

Confidences = Sequence[Sequence[float]] | torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Cost table
# ----------------------------------------------------------------------------------------------------------------------


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


def _strictly_increasing_ints(values: Sequence[int], name: str) -> list[int]:
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
        self.batch_tokens = _strictly_increasing_ints(batch_tokens, "batch_tokens")
        self.context_lengths = None
        self.requests = None
        raw_rows = [steps_per_second]
        for name, keys in (("context_lengths", context_lengths), ("requests", requests)):
            if keys is None:
                continue
            setattr(self, name, _strictly_increasing_ints(keys, name))
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
        self.draft_requests = None if draft_requests is None else _strictly_increasing_ints(draft_requests, "draft_requests")
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
        xs = self.batch_tokens
        if batch_tokens <= xs[0]:
            return row[0]
        if batch_tokens >= xs[-1]:
            if len(xs) == 1:
                return row[-1]
            slope = max((1.0 / row[-1] - 1.0 / row[-2]) / (xs[-1] - xs[-2]), 0.0)
            return 1.0 / (1.0 / row[-1] + slope * (batch_tokens - xs[-1]))
        i = bisect.bisect_right(xs, batch_tokens)
        weight = (batch_tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        return row[i - 1] + weight * (row[i] - row[i - 1])

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


def synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize()


def _forward_seconds(
    model: torch.nn.Module,
    shapes: list[tuple[int, int]],
    context_length: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    generator: torch.Generator,
    masked: bool = False,
) -> list[float]:
    """Median seconds of one forward of `requests × tokens` new tokens after `context_length` cached ones, per
    shape. `masked` passes what `DSparkEngine` passes: per-row position ids and a 2-D attention mask over cache and
    new tokens, with one hole (slot 0) per row as the engine's layout has after rejections."""
    vocab_size = model.config.get_text_config().vocab_size
    prompt = torch.randint(vocab_size, (1, context_length), generator=generator).to(device)
    prefix = DynamicCache(config=model.config)
    model(input_ids=prompt, cache=prefix, use_cache=True)
    caches, inputs = {}, {}
    for requests, tokens in shapes:
        cache = prefix
        if requests > 1:
            cache = compat.copy_cache(prefix)
            cache.batch_repeat_interleave(requests)
        caches[requests, tokens] = cache
        kwargs = {"input_ids": torch.randint(vocab_size, (requests, tokens), generator=generator).to(device)}
        if masked:
            mask = torch.ones(requests, context_length + tokens, dtype=torch.long, device=device)
            mask[:, 0] = 0
            positions = torch.arange(context_length - 1, context_length - 1 + tokens, device=device)
            kwargs.update(attention_mask=mask, position_ids=positions.expand(requests, -1))
        inputs[requests, tokens] = kwargs

    def timed_forward(shape: tuple[int, int]) -> float:
        synchronize(device)
        start = time.perf_counter()
        model(**inputs[shape], cache=caches[shape], use_cache=True)
        synchronize(device)
        elapsed = time.perf_counter() - start
        caches[shape].crop(-shape[1])  # back to the prefilled context
        return elapsed

    return interleaved_median_times(shapes, timed_forward, repeats, warmup)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Puts `model` in eval mode for the block and restores the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _profile_metadata(
    model: torch.nn.Module, device: torch.device, shape: str, contexts: list[int], repeats: int, warmup: int
) -> dict[str, Any]:
    """What a profiled cost table records about how it was measured."""
    return {
        "model": getattr(model.config, "name_or_path", "") or type(model).__name__,
        "device": str(device),
        "dtype": str(getattr(model, "dtype", "")),
        "shape": shape,
        "context_lengths": contexts,
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median",
    }


def interleaved_median_times(
    sizes: Sequence[Hashable], timed: Callable[[Hashable], float], repeats: int, warmup: int
) -> list[float]:
    """Median of `repeats` calls `timed(size)` per size, after `warmup` untimed rounds; every round visits all
    sizes in a rotated order, so a slow phase of a shared machine hits every size alike."""
    for _ in range(warmup):
        for size in sizes:
            timed(size)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for repeat in range(repeats):
        shift = repeat % len(sizes)
        for size in list(sizes[shift:]) + list(sizes[:shift]):
            times[size].append(timed(size))
    return [statistics.median(times[size]) for size in sizes]


@torch.inference_mode()
def profile_cost_table(
    model: torch.nn.Module,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    context_length: int | Sequence[int] = 256,
    repeats: int = 7,
    warmup: int = 2,
    device: str | torch.device | None = None,
    shape: Literal["1xB", "Bx1"] = "1xB",
    smooth: Literal["none", "monotone"] = "none",
    seed: int = 0,
) -> CostTable:
    """Measures SPS(B) of a transformers causal LM for a verification forward of B new tokens.

    The context (random tokens) is prefilled once into a `DynamicCache`; each timed forward appends B tokens and
    the cache is cropped back afterwards, so every measurement sees exactly `context_length` cached tokens. The B
    tokens are laid out as one request of B tokens (`shape="1xB"`, a single-request verification) or B requests
    of one token (`shape="Bx1"`, the cache repeated over the batch). On a shared machine a single timing is
    noise: every size gets `warmup` untimed forwards, then `repeats` rounds visit all sizes in a rotating order
    (interleaved, so a slow phase hits every size alike), and the median time of each size is kept.

    Args:
        model: a causal LM whose forward takes `input_ids`, `cache` and `use_cache`; already on its device.
        batch_sizes: the B values to profile.
        context_length: cached tokens before the verified ones; a sequence profiles one row per length.
        repeats, warmup: timed and untimed forwards per size.
        device: where inputs are placed (defaults to `model.device`).
        shape: `"1xB"` or `"Bx1"`, see above.
        smooth: passed to `CostTable`.
        seed: seed of the random token ids.
    """
    if shape not in ("1xB", "Bx1"):
        raise ValueError(f"`shape` must be '1xB' or 'Bx1', got {shape!r}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    sizes = _strictly_increasing_ints(sorted(set(batch_sizes)), "batch_sizes")
    contexts = [context_length] if isinstance(context_length, int) else list(context_length)
    contexts = _strictly_increasing_ints(sorted(set(contexts)), "context_length")
    device = torch.device(device) if device is not None else model.device
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, size) if shape == "1xB" else (size, 1) for size in sizes]
    with _eval_mode(model):
        rows = [
            [1.0 / t for t in _forward_seconds(model, shapes, c, repeats, warmup, device, generator)]
            for c in contexts
        ]
    metadata = _profile_metadata(model, device, shape, contexts, repeats, warmup)
    if isinstance(context_length, int):
        return CostTable(sizes, rows[0], smooth=smooth, metadata=metadata)
    return CostTable(sizes, rows, context_lengths=contexts, smooth=smooth, metadata=metadata)


@torch.inference_mode()
def profile_verify_cost(
    model: torch.nn.Module,
    num_requests: Sequence[int] = (1, 2, 4, 8, 16, 32),
    widths: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8, 9),
    context_length: int = 256,
    repeats: int = 7,
    warmup: int = 2,
    smooth: Literal["none", "monotone"] = "monotone",
    seed: int = 0,
) -> CostTable:
    """Measures SPS in the shape `DSparkEngine` verifies: R rows of w tokens (anchor + w − 1 drafted), with the
    engine's per-row position ids and 2-D attention mask, after `context_length` cached tokens per row.

    Returns a `CostTable` with a requests axis (`table.requests = num_requests`, `table.batch_tokens = widths`), for
    `DSparkEngine(..., cost_table=...)`; add the draft pass with `.with_draft_cost(*profile_draft_cost(draft))`.
    Profile widths up to 1 + the draft's block size. Timing as in `profile_cost_table` (warmup, interleaved
    repeats, medians); `smooth="monotone"` makes each row's SPS non-increasing in w.

    Example:
        >>> table = profile_verify_cost(target, num_requests=(1, 4, 16), widths=range(1, 6))
        >>> engine = DSparkEngine(target, draft, cost_table=table.with_draft_cost(*profile_draft_cost(draft)))
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    requests = _strictly_increasing_ints(sorted(set(num_requests)), "num_requests")
    widths = _strictly_increasing_ints(sorted(set(widths)), "widths")
    generator = torch.Generator().manual_seed(seed)
    shapes = [(r, w) for r in requests for w in widths]
    with _eval_mode(model):
        times = _forward_seconds(model, shapes, context_length, repeats, warmup, model.device, generator, masked=True)
    seconds = dict(zip(shapes, times, strict=True))
    metadata = _profile_metadata(model, model.device, "RxW", [context_length], repeats, warmup)
    rows = [[1.0 / seconds[r, w] for w in widths] for r in requests]
    return CostTable(widths, rows, smooth=smooth, metadata=metadata, requests=requests)


# ----------------------------------------------------------------------------------------------------------------------
# Survival, throughput and the greedy admission path
# ----------------------------------------------------------------------------------------------------------------------


def _confidence_rows(confidences: Confidences) -> list[list[float]]:
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


def _caps(rows: list[list[float]], max_lengths: Sequence[int] | None) -> list[int]:
    if max_lengths is None:
        return [len(row) for row in rows]
    if len(max_lengths) != len(rows):
        raise ValueError(f"{len(rows)} requests but {len(max_lengths)} max_lengths.")
    if any(int(m) < 0 for m in max_lengths):
        raise ValueError(f"max_lengths must be non-negative, got {list(max_lengths)}.")
    return [min(int(m), len(row)) for m, row in zip(max_lengths, rows, strict=True)]


def _cumprod(row: Sequence[float]) -> list[float]:
    return list(itertools.accumulate(row, lambda a, c: a * c))


def _position_sums(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[int]]:
    """Position-wise sum of the survivals of ragged conditional-confidence rows, and how many rows reach each position."""
    sums: list[float] = []
    counts: list[int] = []
    for row in rows:
        for k, a in enumerate(_cumprod(row)):
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


def survival_probabilities(confidences: Confidences) -> list[list[float]]:
    """Prefix survival a_{r,k} = ∏_{i≤k} c_{r,i} of every request (Algorithm 1, line 2)."""
    return [_cumprod(row) for row in _confidence_rows(confidences)]


def _check_layout(layout: str) -> None:
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
    _check_layout(layout)
    if len(lengths) != len(survival):
        raise ValueError(f"{len(survival)} requests but {len(lengths)} lengths.")
    if any(not 0 <= length <= len(row) for length, row in zip(lengths, survival, strict=True)):
        raise ValueError(f"lengths {list(lengths)} exceed the drafted blocks.")
    expected = sum(1.0 + sum(row[:length]) for row, length in zip(survival, lengths, strict=True))
    drafted_requests = len(survival) if drafted else 0
    return expected / cost_table.round_seconds(
        _verified_tokens(lengths, layout), drafted_requests, requests=len(lengths)
    )


def _ranked_candidates(survival: list[list[float]], caps: list[int]) -> list[tuple[float, int, int]]:
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


def _lengths_from_ranking(ranked: list[tuple[float, int, int]], num_requests: int, count: int) -> list[int]:
    lengths = [0] * num_requests
    for _, k, r in ranked[:count]:
        lengths[r] = k
    return lengths


def _greedy_lengths(
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
    draft_seconds = cost_table.draft_time(num_requests)

    def theta(expected: float, batch_tokens: int) -> float:
        return expected / (1.0 / cost_table.sps(batch_tokens, requests=num_requests) + draft_seconds)

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
    ranked = _ranked_candidates(survival, caps)
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
    return _lengths_from_ranking(ranked, num_requests, best_count)


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
    caps = _caps(rows, max_lengths)
    if math.prod(cap + 1 for cap in caps) > MAX_BRUTE_FORCE_CANDIDATES:
        raise ValueError(f"Exhaustive search over caps {caps} is too large.")
    best_lengths, best_theta = [0] * len(rows), -math.inf
    for lengths in itertools.product(*(range(cap + 1) for cap in caps)):
        theta = expected_throughput(rows, lengths, cost_table, layout)
        if theta > best_theta:
            best_lengths, best_theta = list(lengths), theta
    return best_lengths


# ----------------------------------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------------------------------


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
        rows = _confidence_rows(confidences)
        return self._select(rows, _caps(rows, max_lengths), request_ids)

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
        rows = _confidence_rows(confidences)
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
            scores = row if self.on == "conditional" else _cumprod(row)
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
      the path widens all requests one position at a time (see `_greedy_lengths`).
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
        _check_layout(layout)
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
        lengths = _greedy_lengths(survival, caps, self.cost_table, early_stop=True, layout=self.layout)
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
        survival = [_cumprod(row) for row in confidences]
        return _greedy_lengths(survival, caps, self.cost_table, early_stop=True, layout=self.layout)


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
        return _greedy_lengths(
            [_cumprod(row) for row in confidences], caps, self.cost_table, early_stop=False
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
        survival = [_cumprod(row) for row in stale]
        lengths = _greedy_lengths(survival, [len(row) for row in stale], self.cost_table, early_stop=False)
        return sum(lengths) + cold * self.cold_start_length

    def _select(
        self, confidences: list[list[float]], caps: list[int], request_ids: Sequence[Hashable] | None
    ) -> list[int]:
        ids = self._ids(request_ids, len(confidences))
        ranked = _ranked_candidates([_cumprod(row) for row in confidences], caps)
        lengths = _lengths_from_ranking(ranked, len(confidences), self.budget(ids))
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


# ----------------------------------------------------------------------------------------------------------------------
# Appendix A
# ----------------------------------------------------------------------------------------------------------------------


def appendix_a_cost_table() -> CostTable:
    """The capacity curve of the paper's counterexample: SPS(1) = 1.0, SPS(2) = 0.5, SPS(3) = 0.45."""
    return CostTable([1, 2, 3], [1.0, 0.5, 0.45])


def appendix_a_simulation(
    policy: str | VerificationPolicy = "global", num_trials: int = 20_000, seed: int = 0, **policy_kwargs
) -> torch.Tensor:
    """Monte-Carlo distribution of the first emitted token in the paper's Appendix A counterexample.

    One request, γ = 2, vocabulary {A, B}, target (0.7, 0.3), draft (0.5, 0.5), c_1 = 0.8, and c_2 = 0.9 after
    x_1 = A, 0 after x_1 = B; cost table `appendix_a_cost_table()`. Each trial draws x_1 in the current round and
    in `lag` earlier rounds (stateful policies see those rounds first), asks the policy for ℓ, then runs
    speculative sampling on the first token: if ℓ ≥ 1, x_1 is accepted with probability min(1, p_t/p_d) and
    otherwise replaced by a draw from norm(max(0, p_t − p_d)); if ℓ = 0 the target samples the token itself.

    Returns a float64 tensor `[P(A), P(B)]`. A lossless policy gives (0.7, 0.3) up to sampling error, the global
    search gives (0.85, 0.15). The policy is run on every distinct round history once and the trials are sampled
    vectorized, so 10^5 trials take milliseconds.
    """
    target = torch.tensor([0.7, 0.3], dtype=torch.float64)
    draft = torch.tensor([0.5, 0.5], dtype=torch.float64)
    table = appendix_a_cost_table()

    def fresh_policy() -> VerificationPolicy:
        if isinstance(policy, VerificationPolicy):
            return copy.deepcopy(policy)
        return make_policy(policy, table, **policy_kwargs)

    rounds = getattr(fresh_policy(), "lag", 0) + 1
    decided = []  # ℓ of the last round for every history of first tokens; token i of round t is bit t of the code
    for code in range(2**rounds):
        scheduler = fresh_policy()
        for t in range(rounds):
            length = scheduler.select_lengths([[0.8, 0.9 if (code >> t) & 1 == 0 else 0.0]])[0]
        decided.append(length)

    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(draft, num_trials * rounds, replacement=True, generator=generator).view(
        num_trials, -1
    )
    codes = (draws << torch.arange(rounds)).sum(dim=1)
    admitted = torch.tensor(decided)[codes] >= 1
    token = draws[:, -1]
    accepted = (
        torch.rand(num_trials, generator=generator, dtype=torch.float64)
        < (target / draft).clamp(max=1)[token]
    )
    residual = (target - draft).clamp(min=0)
    resampled = torch.multinomial(
        residual / residual.sum(), num_trials, replacement=True, generator=generator
    )
    fresh = torch.multinomial(target, num_trials, replacement=True, generator=generator)
    output = torch.where(admitted, torch.where(accepted, token, resampled), fresh)
    return torch.bincount(output, minlength=2).to(torch.float64) / num_trials


@torch.inference_mode()
def profile_draft_cost(
    draft: DSparkDraftModel,
    num_requests: Sequence[int] = (1, 2, 4, 8, 16, 32),
    context_length: int = 256,
    repeats: int = 7,
    warmup: int = 2,
    seed: int = 0,
) -> tuple[list[int], list[float]]:
    """Measures d(R), the seconds of one [`DSparkEngine`] draft pass (backbone, sequential head, confidences) over
    R requests with `context_length` context slots each, drafting the full block. The draft must be attached to its
    target (it borrows the target's embedding and LM head).

    The context holds random target features; like `profile_cost_table`, sizes are visited in a rotating order and
    the median of `repeats` timed passes is kept. Returns `(num_requests, seconds)` for `CostTable.with_draft_cost`.

    Example:
        >>> table = profile_verify_cost(target).with_draft_cost(*profile_draft_cost(draft))
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    sizes = sorted(set(int(r) for r in num_requests))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"`num_requests` must be positive integers, got {list(num_requests)}.")
    device, config = draft.device, draft.config
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for rows in sizes:
        cache = DSparkContextCache(config.num_hidden_layers)
        features = torch.randn(rows, context_length, draft.fc.in_features, generator=generator).to(device, draft.dtype)
        context_positions = torch.arange(context_length, device=device).expand(rows, -1)
        draft.extend_context(cache, features, context_positions)
        anchors = torch.randint(config.vocab_size, (rows,), generator=generator).to(device)
        positions = torch.full((rows,), context_length, device=device)
        valid = torch.ones(rows, context_length, dtype=torch.bool, device=device)
        warper = RequestSamplingWarper([SamplingParams()] * rows, device)
        inputs[rows] = (cache, valid, anchors, positions, warper)

    def timed_pass(rows: int) -> float:
        cache, valid, anchors, positions, warper = inputs[rows]
        synchronize(device)
        start = time.perf_counter()
        draft_block(
            draft, cache, anchors, positions, config.block_size, LogitsProcessorList([warper]), context_valid=valid
        )
        synchronize(device)
        return time.perf_counter() - start

    return sizes, interleaved_median_times(sizes, timed_pass, repeats, warmup)
