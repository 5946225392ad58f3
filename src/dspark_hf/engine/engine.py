"""Batched DSpark speculative decoding with load-aware verification (paper §3.2.2 and §5).

[`DSparkEngine`] serves many requests at once. Each round over the R active requests:

1. **Draft.** One batched backbone pass over R blocks (anchor + γ−1 masks), each block attending to its own
   request's context through the attention mask; tokens are then sampled left to right through the sequential head
   ([`sample_block`]), each from exactly the distribution that is kept for rejection sampling.
2. **Schedule.** The verification policy picks per-request lengths ℓ_r from the calibrated confidences and the
   load (Algorithm 1 with a cost table, its lagged §5.2 variant, a static threshold, the full block, ...). Before
   step 1 the policy may decide, from earlier rounds only, that drafting cannot pay this round (a cost table with
   the draft pass time, see `profile_draft_cost`); the round then verifies nothing but the anchors.
3. **Verify.** ONE target pass over R rows of 1 + ℓ_r tokens (anchor + drafted prefix), right-padded to
   Q = 1 + max ℓ_r, with per-row position ids and a 2-D attention mask over the whole KV cache.
4. **Accept.** Standard speculative sampling per row: accept x_k with probability min(1, p(x_k)/q(x_k)); at the
   first rejection resample from norm(max(0, p − q)); if all ℓ_r survive add a bonus token from p. Greedy rows use
   one-hot p and q, which makes this exactly an argmax comparison.
5. **Bookkeeping.** The target features of the verified tokens (anchor + accepted drafts) of this same pass extend
   the draft's context; rejected and padded positions become holes in the attention mask.

The target's KV cache, the draft's context and the slot validity share one ragged layout ([`RaggedKVLayout`]):
every round appends Q slots to every row, and holes are removed by compaction once the fullest row wastes more
than `compact_threshold` of the width. Requests joining are prefilled in their own batched pass and merged into the
layout; finished requests are dropped by row selection.
"""

import ctypes
import gc
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessorList
from transformers.utils import logging

from .. import compat
from ..models.dspark.modeling_dspark import DSparkDraftModel, target_hidden_state_indices
from ..models.eagle3.modeling_eagle3 import Eagle3DraftModel
from ..scheduling import (
    CostTable,
    FullBlockPolicy,
    NoSpeculationPolicy,
    VerificationPolicy,
    make_policy,
)
from ..speculative.round import draw_tokens, speculative_accept
from ..speculative.sampling import RequestSamplingWarper, SamplingParams
from .drafting import make_drafter
from .kv_layout import RaggedKVLayout
from .requests import EngineRequest, EngineStats

logger = logging.get_logger(__name__)

SUPPORTED_ATTENTION = ("sdpa", "eager")


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def release_free_memory() -> bool:
    """Collects garbage and hands the C heap's free pages back to the OS (glibc's `malloc_trim`), which otherwise
    keeps the peak of a burst's activations resident. Returns False where `malloc_trim` does not exist (not glibc)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


class DSparkEngine:
    """Continuous-batching speculative decoding over a transformers causal LM with a [`DSparkDraftModel`] or an
    [`Eagle3DraftModel`].

    Args:
        target: the causal LM (sdpa or eager attention; outputs stay exactly the target's, see docs/engine.md).
        draft: a DSpark or EAGLE-3 draft for `target`, or None for plain batched decoding. An EAGLE-3 draft drafts
            by a chain of γ draft steps per row (`engine/drafting.py`); its confidences are its own probabilities
            of its tokens, so every policy can schedule it.
        scheduler: a [`VerificationPolicy`] or a policy name of `dspark_hf.scheduling.make_policy` (`"prefix"` =
            Algorithm 1, `"lagged"` = §5.2, `"threshold"`, `"full"`, `"none"`). Default: `"prefix"` when a
            `cost_table` is given, `"full"` with a draft, `"none"` without. Policies must be lossless. By name,
            `"prefix"` schedules for this engine's padded verification batch (`layout="padded"`).
        cost_table: SPS table for the `"prefix"` and `"lagged"` policies, best profiled in this engine's own shapes
            (`profile_verify_cost`, R rows × width); with a draft pass time (`CostTable.with_draft_cost`,
            `profile_draft_cost`) `"prefix"` also skips drafting in rounds where it cannot pay.
        tokenizer: decodes `text` and enables stop strings and string prompts.
        max_batch_size: most requests decoded at once; later ones wait (None: no limit).
        max_draft_tokens: cap on every ℓ_r (1 gives an MTP-1-style one-token draft); default the draft's γ (a DSpark
            draft's `block_size`). For an EAGLE-3 draft it is γ, the draft-step chain's length (default
            `ttt_length`).
        compact_threshold: compact the KV layout when the fullest row wastes more than this fraction of the width
            (0 compacts after every round with holes, 1 never).
        policy_kwargs: constructor arguments when `scheduler` is a name (e.g. `threshold=0.5`).

    Example:
        >>> engine = DSparkEngine(target, draft, scheduler="prefix", cost_table=table)
        >>> outputs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=32))
        >>> outputs[0].token_ids, engine.stats.mean_verification_budget
    """

    def __init__(
        self,
        target: PreTrainedModel,
        draft: DSparkDraftModel | Eagle3DraftModel | None = None,
        scheduler: VerificationPolicy | str | None = None,
        cost_table: CostTable | None = None,
        tokenizer=None,
        max_batch_size: int | None = None,
        max_draft_tokens: int | None = None,
        compact_threshold: float = 0.5,
        **policy_kwargs,
    ):
        attention = compat.attention_implementation(target.config)
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"DSparkEngine needs the target's attention to take a 2-D mask with holes ({SUPPORTED_ATTENTION}), "
                f"got {attention!r}; load it with attn_implementation='sdpa'."
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        if max_draft_tokens is not None and max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1 (use scheduler='none' for plain decoding), got {max_draft_tokens}.")
        if not 0.0 <= compact_threshold <= 1.0:
            raise ValueError(f"compact_threshold must be in [0, 1], got {compact_threshold}.")
        self.drafter = None
        if draft is not None:
            self.drafter = make_drafter(draft, max_draft_tokens)
            draft.attach(target)
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.policy = self._resolve_policy(scheduler, cost_table, policy_kwargs)
        self.speculative = draft is not None and not isinstance(self.policy, NoSpeculationPolicy)
        self.block_size = self.drafter.block_size if self.speculative else 0
        self.max_draft_tokens = min(self.block_size, max_draft_tokens or self.block_size)
        self.max_batch_size = max_batch_size
        self.compact_threshold = compact_threshold
        self.vocab_size = target.config.get_text_config().vocab_size
        self.sliding_window = _sliding_window(target.config.get_text_config())
        self.stats = EngineStats()
        self._hidden_kwargs = (
            {"output_hidden_states": target_hidden_state_indices(draft.config.target_layer_ids)}
            if self.speculative
            else {}
        )
        self._rows: list[EngineRequest] = []
        self._kv: RaggedKVLayout | None = None
        self._waiting: deque[EngineRequest] = deque()
        self._requests: dict[str, EngineRequest] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._work = threading.Condition(self._lock)

    def _resolve_policy(self, scheduler, cost_table: CostTable | None, policy_kwargs: dict) -> VerificationPolicy:
        if scheduler is None:
            scheduler = "none" if self.draft is None else ("prefix" if cost_table is not None else "full")
        if isinstance(scheduler, str):
            if scheduler == "prefix":  # the engine's verification batch is padded, see PrefixSchedulerPolicy
                policy_kwargs = {"layout": "padded", **policy_kwargs}
            policy = make_policy(scheduler, cost_table, **policy_kwargs)
        elif isinstance(scheduler, VerificationPolicy):
            if policy_kwargs:
                raise ValueError(f"Policy arguments {sorted(policy_kwargs)} are only used with a policy name.")
            policy = scheduler
        else:
            raise ValueError(f"scheduler must be a VerificationPolicy or a policy name, got {scheduler!r}.")
        if not policy.lossless:
            raise ValueError(f"{type(policy).__name__} is not lossless; DSparkEngine only runs lossless policies.")
        if self.draft is None and not isinstance(policy, NoSpeculationPolicy):
            raise ValueError(f"The {type(policy).__name__} policy needs a draft model (draft=None decodes plainly).")
        needs_confidence = not isinstance(policy, (FullBlockPolicy, NoSpeculationPolicy))
        if needs_confidence and not self.drafter.has_confidences:
            raise ValueError(
                f"The {type(policy).__name__} policy needs confidences but this draft has no confidence head; "
                "use scheduler='full'."
            )
        return policy

    # -- requests ----------------------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Sequence[int] | torch.Tensor | str,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        callback: Callable[[EngineRequest, list[int], str], None] | None = None,
    ) -> EngineRequest:
        """Queues a request (thread-safe); it joins the batch at the next [`step`].

        Args:
            prompt: token ids (a list, or a `(n,)` / `(1, n)` tensor), or a string when the engine has a tokenizer.
            params: sampling parameters (default greedy, 16 tokens).
            request_id: a unique id (default: generated).
            callback: streaming callback, see [`EngineRequest`].
        """
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("Stop strings need a tokenizer: DSparkEngine(..., tokenizer=tokenizer).")
        if self.sliding_window is not None:
            needed = len(prompt_ids) + params.max_new_tokens + self.block_size
            if needed > self.sliding_window:
                raise ValueError(
                    f"The target uses sliding-window attention ({self.sliding_window}); a request needs "
                    f"prompt + max_new_tokens + γ = {needed} within the window."
                )
        with self._lock:
            request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
            if request_id in self._requests:
                raise ValueError(f"Request id {request_id!r} is already in use.")
            request = EngineRequest(request_id, prompt_ids, params, self.block_size, callback)
            self._requests[request_id] = request
            self._waiting.append(request)
            self._work.notify_all()
        return request

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("A string prompt needs a tokenizer: DSparkEngine(..., tokenizer=tokenizer).")
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1:
                raise ValueError(f"A prompt tensor must be (n,) or (1, n), got shape {tuple(prompt.shape)}.")
            prompt = prompt.tolist()
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("The prompt is empty.")
        if not all(0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"Prompt token ids must lie in [0, {self.vocab_size}).")
        return ids

    def cancel(self, request_id: str) -> bool:
        """Cancels a waiting or running request (thread-safe); returns False if it is unknown or already finished.

        A running request leaves the batch at the start of the next step; either way it finishes with
        `finish_reason="cancelled"` and keeps the tokens it already produced.
        """
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.finished or request.cancel_requested:
                return False
            request.cancel_requested = True
            self._work.notify_all()
        return True

    def has_unfinished(self) -> bool:
        """Whether any added request has not finished yet."""
        with self._lock:
            return bool(self._requests)

    @property
    def num_active(self) -> int:
        """Requests in the running batch."""
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        """Requests added but not yet in the batch."""
        with self._lock:
            return len(self._waiting)

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    # -- driving -----------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor | str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[EngineRequest]:
        """Adds `prompts` (one `params` for all, or one each) and steps until they are all finished."""
        if isinstance(params, Sequence):
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams.")
        else:
            params = [params] * len(prompts)
        requests = [self.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        while not all(r.finished for r in requests):
            self.step()
        return requests

    def run_forever(self, stop: threading.Event, idle_wait_s: float = 0.05, release_memory_when_idle: bool = True) -> None:
        """Steps while there is work until `stop` is set (run it in one background thread).

        A prefill or round that raises fails only the request it is pinned on ([`step`] retries the others one at
        a time); an exception that no single request explains finishes every request with `finish_reason="error"`
        instead of killing the loop. With `release_memory_when_idle`, each time the last request finishes the
        memory freed by the batch is handed back to the OS ([`release_free_memory`]), so the resident size of a
        long-running server returns to its idle level after every burst instead of keeping its peak.
        """
        worked = False
        while not stop.is_set():
            with self._lock:
                idle = not self._requests
                if idle and not (worked and release_memory_when_idle):
                    self._work.wait(idle_wait_s)
                    continue
            if idle:
                release_free_memory()
                worked = False
                continue
            worked = True
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - reported to every request, the loop keeps serving
                logger.exception("DSparkEngine step failed")
                self._fail_all(f"{type(error).__name__}: {error}")

    def wake(self) -> None:
        """Wakes an idle [`run_forever`] loop (e.g. after setting its stop event)."""
        with self._lock:
            self._work.notify_all()

    @torch.no_grad()
    def step(self) -> list[EngineRequest]:
        """Removes cancelled requests, prefills waiting ones, runs one speculative round; returns finished requests."""
        with self._step_lock:
            started = time.perf_counter()
            with self._lock:
                cancelled = [r for r in self._rows if r.cancel_requested]
                waiting_cancelled = [r for r in self._waiting if r.cancel_requested]
                for request in waiting_cancelled:
                    self._waiting.remove(request)
                room = len(self._waiting) if self.max_batch_size is None else self.max_batch_size - len(self._rows)
                room += len(cancelled)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            finished = []
            for request in cancelled + waiting_cancelled:
                self._finish(request, "cancelled")
                request.deliver([], "")
            self._remove(cancelled)
            finished += cancelled + waiting_cancelled
            if joining:
                finished += self._prefill_isolating_failures(joining)
            if self._rows:
                finished += self._round_isolating_failures()
            self.stats.busy_time_s += time.perf_counter() - started
            return finished

    # -- internals ---------------------------------------------------------------------------------------------------

    def _prefill_isolating_failures(self, joining: list[EngineRequest]) -> list[EngineRequest]:
        """[`_prefill`], and when it raises, the joining requests one at a time, so that a request whose prefill
        fails (e.g. its sampling settings overflow) finishes with an error alone and the others join the batch.
        `_prefill` changes no state before its last step, so a failed attempt leaves the batch as it was."""
        try:
            return self._prefill(joining)
        except Exception as error:  # noqa: BLE001 - reported to the request that caused it
            if len(joining) > 1:
                return [r for request in joining for r in self._prefill_isolating_failures([request])]
            logger.exception("DSparkEngine prefill of request %s failed", joining[0].request_id)
            self._fail([joining[0]], f"{type(error).__name__}: {error}")
            return joining

    def _round_isolating_failures(self) -> list[EngineRequest]:
        """[`_round`], and when it raises, each active request's round alone, so that a request whose round fails
        (e.g. its sampling meets a distribution it cannot draw from) finishes with an error alone and the others go
        on. A failed `_round` leaves the layout as it was (it removes the slots its verify pass appended), and no
        request's tokens change before its last step."""
        try:
            return self._round()
        except Exception as error:  # noqa: BLE001 - reported to the request that caused it
            rows, kv = self._rows, self._kv
            if len(rows) == 1:
                logger.exception("DSparkEngine round of request %s failed", rows[0].request_id)
                self._fail(rows, f"{type(error).__name__}: {error}")
                self._rows, self._kv = [], None
                return rows
        finished, kept_rows, kept_kv = [], [], None
        for i, request in enumerate(rows):
            self._rows, self._kv = [request], kv.take(torch.tensor([i], device=kv.valid.device))
            finished += self._round_isolating_failures()
            if self._rows:
                kept_rows += self._rows
                if kept_kv is None:
                    kept_kv = self._kv
                else:
                    kept_kv.merge(self._kv)
        self._rows, self._kv = kept_rows, kept_kv
        return finished

    def _prefill(self, joining: list[EngineRequest]) -> list[EngineRequest]:
        """One batched (left-padded) prefill of the joining requests; emits their first token and joins the batch."""
        started = time.perf_counter()
        device = self.target.device
        width = max(len(r.prompt_token_ids) for r in joining)
        input_ids = torch.zeros(len(joining), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(joining), width, dtype=torch.bool, device=device)
        for i, request in enumerate(joining):
            n = len(request.prompt_token_ids)
            input_ids[i, width - n :] = torch.tensor(request.prompt_token_ids, device=device)
            valid[i, width - n :] = True
        position_ids = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.target(
            input_ids=input_ids,
            attention_mask=valid.long(),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **self._hidden_kwargs,
        )
        warper = RequestSamplingWarper([r.params for r in joining], device)
        first = draw_tokens(warper.probabilities(out.logits[:, -1:])[:, 0], warper.greedy)
        draft_cache, draft_state = None, None
        if self.speculative:
            draft_cache, draft_state = self.drafter.prefill(out.hidden_states, input_ids, first, position_ids, valid)
        kv = RaggedKVLayout(cache, draft_cache, valid, draft_state)
        if self._kv is None:
            self._kv = kv
        else:
            self._kv.merge(kv)
        self._rows += joining
        for request, token in zip(joining, first.tolist(), strict=True):
            self._emit(request, [token])
        self.stats.prefills += 1
        self.stats.prefill_time_s += time.perf_counter() - started
        return self._retire()

    def _round(self) -> list[EngineRequest]:
        """One draft → schedule → verify → accept round over every active request."""
        rows, kv, device = self._rows, self._kv, self.target.device
        started = time.perf_counter()
        anchors = torch.tensor([r.token_ids[-1] for r in rows], device=device)
        positions = torch.tensor([r.num_tokens - 1 for r in rows], device=device)
        caps = [min(self.max_draft_tokens, r.remaining - 1) for r in rows]
        warper = RequestSamplingWarper([r.params for r in rows], device)
        block, lengths = None, [0] * len(rows)
        request_ids = [r.request_id for r in rows]
        if self.speculative and max(caps) > 0:
            if self.policy.should_draft(request_ids, caps):
                # Greedy rows' warped logits are one-hot, so when every row is greedy the argmax is the token a draw would give.
                block = self.drafter.draft_tokens(
                    kv, anchors, positions, max(caps), LogitsProcessorList([warper]), do_sample=not warper.all_greedy
                )
                self.stats.draft_passes += 1
                confidences = block.confidences
                if confidences is None:  # full-block verification without a confidence head
                    confidences = torch.ones(block.tokens.shape)
                lengths = self.policy.select_lengths(confidences, max_lengths=caps, request_ids=request_ids)
            else:
                self.stats.skipped_drafts += 1
        drafted = time.perf_counter()

        width = 1 + max(lengths)
        offsets = torch.arange(width, device=device)
        lengths_t = torch.tensor(lengths, device=device)
        new_valid = offsets <= lengths_t.unsqueeze(-1)
        input_ids = anchors.unsqueeze(-1).repeat(1, width)
        if width > 1:
            input_ids[:, 1:] = torch.where(new_valid[:, 1:], block.tokens[:, : width - 1], 0)
        position_ids = positions.unsqueeze(-1) + offsets
        if self.sliding_window is not None and kv.width + width > self.sliding_window:
            kv.compact()  # holes must not push verified slots out of the window (add_request bounds the length)
            self.stats.compactions += 1
        width_before, valid_before = kv.width, kv.valid
        try:
            out = self.target(
                input_ids=input_ids,
                attention_mask=torch.cat([kv.valid, new_valid], dim=1).long(),
                position_ids=position_ids,
                cache=kv.cache,
                use_cache=True,
                **self._hidden_kwargs,
            )
            accepted, next_tokens = speculative_accept(
                warper.probabilities(out.logits), block, lengths_t, warper.greedy
            )
            kv.valid = torch.cat([kv.valid, offsets <= accepted.unsqueeze(-1)], dim=1)
            if self.speculative:  # features of the anchor and the accepted tokens; the rest are holes
                self.drafter.extend(
                    kv, out.hidden_states, input_ids, position_ids, valid_before, accepted, next_tokens
                )
        except BaseException:
            kv.truncate(width_before, valid_before)  # this round's slots leave both caches
            raise
        verified = time.perf_counter()

        accepted_list, next_list = accepted.tolist(), next_tokens.tolist()
        drafted_tokens = block.tokens.tolist() if block is not None else None
        raw_confidences = block.confidence_logits if block is not None else None
        for r, request in enumerate(rows):
            m, length = accepted_list[r], lengths[r]
            request.stats.record_round(
                length, m, [] if raw_confidences is None else raw_confidences[r, :length].tolist()
            )
            request.stats.draft_time_s += drafted - started
            request.stats.verify_time_s += verified - drafted
            self._emit(request, (drafted_tokens[r][:m] if m else []) + [next_list[r]])

        stats = self.stats
        stats.rounds += 1
        stats.request_rounds += len(rows)
        stats.verified_draft_tokens += sum(lengths)
        stats.accepted_draft_tokens += sum(accepted_list)
        stats.target_tokens += len(rows) + sum(lengths)
        stats.padded_target_tokens += len(rows) * width
        stats.draft_time_s += drafted - started
        stats.verify_time_s += verified - drafted
        finished = self._retire()
        if self._kv is not None:
            self._kv.trim()
            if self._kv.waste() > self.compact_threshold:
                self._kv.compact()
                stats.compactions += 1
        return finished

    def _emit(self, request: EngineRequest, new_tokens: list[int]) -> None:
        """Appends a round's tokens to `request`, cut at stops and `max_new_tokens`, and streams them."""
        params, start = request.params, len(request.token_ids)
        reason = None
        kept = []
        for token in new_tokens:
            kept.append(token)
            if token in params.stop_token_ids:
                reason = "stop"
                break
            if start + len(kept) >= params.max_new_tokens:
                reason = "length"
                break
        request.token_ids.extend(kept)
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        delta = ""
        if self.tokenizer is not None:
            delta, stopped = self._text_delta(request, start, ends_with_stop_id=reason == "stop")
            reason = "stop" if stopped else reason
        if reason is not None:
            self._finish(request, reason)
        request.text += delta
        self.stats.generated_tokens += len(request.token_ids) - start
        request.deliver(request.token_ids[start:], delta)

    def _text_delta(self, request: EngineRequest, start: int, ends_with_stop_id: bool) -> tuple[str, bool]:
        """New text of `request` since the last call, and whether a stop string ended it (tokens are cut there)."""
        decode = self._decode
        tokens = request.token_ids[:-1] if ends_with_stop_id else request.token_ids
        text = decode(tokens)
        hits = [(text.find(s), s) for s in request.params.stop if s in text]
        if hits:
            index, stop = min(hits)
            for end in range(start + 1, len(tokens) + 1):  # keep tokens up to the one completing the stop string
                if stop in decode(tokens[:end]):
                    del request.token_ids[end:]
                    break
            return text[len(request.text) : index], True
        if not ends_with_stop_id and request.remaining > 0:
            # Hold back an incomplete character and anything that may still grow into a stop string.
            safe = len(text.rstrip("\ufffd"))
            if request.params.stop:
                safe = min(safe, len(text) - max(len(s) for s in request.params.stop) + 1)
            return text[len(request.text) : max(safe, len(request.text))], False
        return text[len(request.text) :], False

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _finish(self, request: EngineRequest, reason: str) -> None:
        request.finish_reason = reason
        request.finish_time = time.perf_counter()
        self.stats.finished_requests += 1
        with self._lock:
            self._requests.pop(request.request_id, None)
        self.policy.forget([request.request_id])

    def _retire(self) -> list[EngineRequest]:
        """Removes finished requests from the batch and returns them."""
        finished = [r for r in self._rows if r.finished]
        self._remove(finished)
        return finished

    def _remove(self, requests: list[EngineRequest]) -> None:
        if not requests:
            return
        leaving = {id(r) for r in requests}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in leaving]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._kv = None
        else:
            self._kv.select(torch.tensor(keep, device=self._kv.valid.device))

    def _fail_all(self, message: str) -> None:
        """Finishes every unfinished request (in the batch, waiting, or taken from the queue by the failed step) with
        `finish_reason="error"`, so that no client waits forever and the loop goes idle."""
        with self._lock:
            requests = list(self._requests.values())
            self._waiting.clear()
        self._rows, self._kv = [], None
        self._fail(requests, message)

    def _fail(self, requests: list[EngineRequest], message: str) -> None:
        for request in requests:
            if not request.finished:
                request.error = message
                self._finish(request, "error")
                request.deliver([], "")


__all__ = ["DSparkEngine", "release_free_memory"]
