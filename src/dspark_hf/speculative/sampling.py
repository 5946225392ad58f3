"""Per-request sampling settings and the per-row sampling distributions they define (batched drivers: the engine)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessor


@dataclass
class SamplingParams:
    """How one request is decoded.

    Args:
        max_new_tokens: most tokens to generate (≥ 1).
        do_sample: sample (True) or take the argmax (False; temperature, top_k and top_p are then ignored).
        temperature: divides the logits before sampling (> 0 when sampling).
        top_k: keep the k most likely tokens (0 disables), applied after the temperature.
        top_p: keep the smallest set of tokens with cumulative probability ≥ top_p (1 disables), applied last.
        stop_token_ids: generation stops after emitting one of these; it ends `token_ids` but not `text`.
        stop: stop strings (need the engine's tokenizer). Generation stops once the text contains one; `text` is cut
            before it and `token_ids` end with the token that completed it.
    """

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] | str = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if self.do_sample and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r} (use do_sample=False).")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}.")


def warp_logits(
    logits: torch.Tensor,
    greedy: torch.BoolTensor,
    temperature: torch.Tensor,
    top_k: torch.LongTensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Per-row sampling distribution as float32 logits (softmax gives the exact distribution a token is drawn from).

    Args:
        logits: `(..., V)`.
        greedy, temperature, top_k, top_p: per-row parameters, broadcastable to `logits.shape[:-1]`. Sampling rows
            get temperature, then top-k, then top-p (transformers' warper order and semantics); greedy rows become
            one-hot at the argmax (−inf elsewhere), so greedy decoding is speculative sampling with one-hot p and q.
    """
    logits = logits.float()
    shape = logits.shape[:-1]
    greedy, temperature, top_k, top_p = (t.expand(shape) for t in (greedy, temperature, top_k, top_p))
    warped = logits / temperature.unsqueeze(-1)
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=logits.shape[-1]), logits.shape[-1])
        kth = warped.sort(dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
        warped = warped.masked_fill(warped < kth, -math.inf)
    if bool((top_p < 1).any()):
        sorted_logits, order = warped.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p).unsqueeze(-1)
        remove[..., -1] = False
        warped = warped.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    one_hot = torch.full_like(logits, -math.inf).scatter(-1, logits.argmax(dim=-1, keepdim=True), 0.0)
    return torch.where(greedy.unsqueeze(-1), one_hot, warped)


class RequestSamplingWarper(LogitsProcessor):
    """[`warp_logits`] as a transformers logits processor over a batch of requests (one row each)."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device):
        self.greedy = torch.tensor([not p.do_sample for p in params], device=device)
        self.temperature = torch.tensor([p.temperature if p.do_sample else 1.0 for p in params], device=device)
        self.top_k = torch.tensor([p.top_k if p.do_sample else 0 for p in params], device=device)
        self.top_p = torch.tensor([p.top_p if p.do_sample else 1.0 for p in params], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return warp_logits(scores, self.greedy, self.temperature, self.top_k, self.top_p)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Target logits `(R, Q, V)` → sampling probabilities `(R, Q, V)` of every row and position."""
        params = (t.unsqueeze(-1) for t in (self.greedy, self.temperature, self.top_k, self.top_p))
        return torch.softmax(warp_logits(logits, *params), dim=-1)

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())
