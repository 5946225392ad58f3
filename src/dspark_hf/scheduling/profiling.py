"""Cost profiling: timing target verification forwards (SPS(B), in the shapes of single-request generation and of
`DSparkEngine`) and the engine's draft pass (d(R)), interleaved and reduced to medians."""

import contextlib
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import LogitsProcessorList

from .. import compat
from ..models.dspark.modeling_dspark import DSparkContextCache, DSparkDraftModel
from ..speculative.round import draft_block
from ..speculative.sampling import RequestSamplingWarper, SamplingParams
from .cost_table import CostTable, strictly_increasing_ints


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on `device` (a no-op on the CPU)."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize()


def timed_seconds(device: torch.device, call: Callable[[], Any]) -> float:
    """Wall-clock seconds of `call()`, with `device` synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def _check_timing(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")


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
        elapsed = timed_seconds(device, lambda: model(**inputs[shape], cache=caches[shape], use_cache=True))
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
    _check_timing(repeats, warmup)
    sizes = strictly_increasing_ints(sorted(set(batch_sizes)), "batch_sizes")
    contexts = [context_length] if isinstance(context_length, int) else list(context_length)
    contexts = strictly_increasing_ints(sorted(set(contexts)), "context_length")
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
    _check_timing(repeats, warmup)
    requests = strictly_increasing_ints(sorted(set(num_requests)), "num_requests")
    widths = strictly_increasing_ints(sorted(set(widths)), "widths")
    generator = torch.Generator().manual_seed(seed)
    shapes = [(r, w) for r in requests for w in widths]
    with _eval_mode(model):
        times = _forward_seconds(model, shapes, context_length, repeats, warmup, model.device, generator, masked=True)
    seconds = dict(zip(shapes, times, strict=True))
    metadata = _profile_metadata(model, model.device, "RxW", [context_length], repeats, warmup)
    rows = [[1.0 / seconds[r, w] for w in widths] for r in requests]
    return CostTable(widths, rows, smooth=smooth, metadata=metadata, requests=requests)


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
    _check_timing(repeats, warmup)
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
        return timed_seconds(
            device,
            lambda: draft_block(
                draft, cache, anchors, positions, config.block_size, LogitsProcessorList([warper]), context_valid=valid
            ),
        )

    return sizes, interleaved_median_times(sizes, timed_pass, repeats, warmup)
