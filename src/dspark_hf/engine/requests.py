"""What a [`DSparkEngine`] serves and counts: one submitted request ([`EngineRequest`]) and the engine-wide
counters ([`EngineStats`])."""

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..speculative.sampling import SamplingParams
from ..speculative.stats import SpeculationStats

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class EngineRequest:
    """A request submitted to a [`DSparkEngine`].

    The engine fills it in while it runs: `token_ids` (generated tokens), `text` (their decoded text, empty without
    a tokenizer), `finish_reason` (`None` while running, then one of "stop", "length", "cancelled", "error"),
    `error`, per-request speculation `stats` and `perf_counter` timestamps. Read them after [`wait`].
    `cancel_requested` is set by [`DSparkEngine.cancel`]; the request leaves the batch at the engine's next step.

    Args:
        callback: called by the engine thread as `callback(request, new_token_ids, new_text)` once per round that
            produced tokens; the last call has `request.finished` True (a cancelled request gets a call with no
            tokens). The concatenated arguments are exactly `token_ids` and `text`.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        callback: Callable[["EngineRequest", list[int], str], None] | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.callback = callback
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats = SpeculationStats(block_size=block_size)
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.cancel_requested = False
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens; the last one is the anchor of the next round."""
        return len(self.prompt_token_ids) + len(self.token_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second from arrival to finish (the per-user speed)."""
        if self.finish_time is None or self.finish_time <= self.arrival_time:
            return 0.0
        return len(self.token_ids) / (self.finish_time - self.arrival_time)

    def deliver(self, new_token_ids: list[int], new_text: str) -> None:
        """Hands a round's output to the callback (engine thread); once finished, releases [`wait`]."""
        if self.callback is not None:
            self.callback(self, new_token_ids, new_text)
        if self.finished:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request finished (or `timeout` seconds passed); returns whether it finished."""
        return self._done.wait(timeout)

    def __repr__(self) -> str:
        return (
            f"EngineRequest(id={self.request_id!r}, prompt={len(self.prompt_token_ids)} tokens, "
            f"generated={len(self.token_ids)}, finish_reason={self.finish_reason!r})"
        )


@dataclass
class EngineStats:
    """Counters of a [`DSparkEngine`] since construction (or [`DSparkEngine.reset_stats`]).

    A round is one target verification pass over all active requests; `request_rounds` counts (request, round)
    pairs, so `verified_draft_tokens / request_rounds` is the mean verification budget ℓ per request and round.
    `draft_passes` counts rounds that drafted, `skipped_drafts` rounds in which the policy chose not to.
    """

    rounds: int = 0
    prefills: int = 0
    request_rounds: int = 0
    verified_draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    target_tokens: int = 0
    padded_target_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    compactions: int = 0
    draft_passes: int = 0
    skipped_drafts: int = 0
    busy_time_s: float = 0.0
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of engine work (time spent inside `step`)."""
        return self.generated_tokens / self.busy_time_s if self.busy_time_s > 0 else 0.0

    @property
    def mean_verification_budget(self) -> float:
        """Mean ℓ_r: drafted tokens sent for verification per request and round."""
        return self.verified_draft_tokens / self.request_rounds if self.request_rounds else 0.0

    @property
    def mean_batch_tokens(self) -> float:
        """Mean B = Σ_r (1 + ℓ_r) per verification pass."""
        return self.target_tokens / self.rounds if self.rounds else 0.0

    @property
    def mean_active_requests(self) -> float:
        return self.request_rounds / self.rounds if self.rounds else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens gained per request and round, the bonus/correction token included."""
        return (self.accepted_draft_tokens + self.request_rounds) / self.request_rounds if self.request_rounds else 0.0

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(
            tokens_per_second=self.tokens_per_second,
            mean_verification_budget=self.mean_verification_budget,
            mean_batch_tokens=self.mean_batch_tokens,
            mean_active_requests=self.mean_active_requests,
            tau=self.tau,
        )
        return data


__all__ = ["FINISH_REASONS", "EngineRequest", "EngineStats"]
