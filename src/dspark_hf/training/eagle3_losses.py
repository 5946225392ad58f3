"""The EAGLE-3 training loss over the TTT steps of [`Eagle3DraftModel.ttt_forward`], as the reference (DeepSpec's
`compute_eagle3_loss`) computes it: soft cross-entropy of every step against the target's next-token distribution,
position masks, one normaliser per step, and decay weights."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .metrics import RunningSums


@dataclass
class Eagle3LossOutput:
    """What [`eagle3_loss`] computes (T = TTT steps, B = batch, S = sequence length).

    Args:
        loss: `()` total Σ_k decay^k · ℓ_k.
        step_losses: `(T,)` ℓ_k = Σ of the supervised rows' soft cross-entropy / (B·S).
        row_losses: `(T, B, S)` per-row soft cross-entropy, 0 where not supervised.
        position_mask: `(T, B, S)` 1 where step k at index q is supervised.
        step_weights: `(T,)` decay^k.
        accuracy: `(T, 2)` [rows whose draft argmax equals the target's argmax, supervised rows].
        accept_rate: `(T, 2)` [Σ clamp(1 − ½‖p_draft − p_target‖₁, 0, 1), supervised rows].
        tau_greedy, tau_probabilistic: `(2,)` [numerator, denominator] of the expected tokens per round from the
            rows supervised at step 0: (Σ_rows Σ_k Π_{j≤k} c_j + rows) / rows, with c_j the step-j match (greedy) or
            acceptance rate (probabilistic) at the same index, 0 where step j is not supervised.
    """

    loss: torch.Tensor
    step_losses: torch.Tensor
    row_losses: torch.Tensor
    position_mask: torch.Tensor
    step_weights: torch.Tensor
    accuracy: torch.Tensor
    accept_rate: torch.Tensor
    tau_greedy: torch.Tensor
    tau_probabilistic: torch.Tensor

    def statistics(self) -> torch.Tensor:
        """All additive statistics as one float32 vector `(4T + 4,)` (for a single all-reduce across processes):
        per-step sums of supervised rows' cross-entropy, supervised rows, argmax matches and acceptance, then the
        numerators and denominators of the greedy and probabilistic τ."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.row_losses.detach().flatten(1).sum(-1),
                    self.accuracy[:, 1],
                    self.accuracy[:, 0],
                    self.accept_rate[:, 0],
                    self.tau_greedy,
                    self.tau_probabilistic,
                ]
            ).float()

    @property
    def metrics(self) -> dict[str, float]:
        """Means of this batch alone (see [`Eagle3MetricAccumulator`] for running means)."""
        accumulator = Eagle3MetricAccumulator(ttt_length=self.step_losses.shape[0])
        accumulator.add(self.statistics())
        return accumulator.compute()


@dataclass
class Eagle3MetricAccumulator(RunningSums):
    """Running sums of [`Eagle3LossOutput.statistics`] vectors → means for logging.

    Metric names (k = 1..T, TTT step k−1): `ce_k` (mean soft cross-entropy of the supervised rows, nats),
    `accuracy_k` (share of rows whose draft argmax is the target's), `acceptance_k` (mean clamp(1 − TV, 0, 1): the
    acceptance probability of a drafted token), `tau_greedy` and `expected_tau` (expected tokens per round, bonus
    included, from the argmax matches / the acceptance probabilities, as the reference logs them).
    """

    ttt_length: int
    sums: torch.Tensor | None = None

    def compute(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        steps = self.ttt_length
        ce, count, matches, accepted = (self.sums[i * steps : (i + 1) * steps].tolist() for i in range(4))
        tau_greedy, tau_probabilistic = self.sums[4 * steps : 4 * steps + 2], self.sums[4 * steps + 2 :]
        metrics = {}
        for k in range(steps):
            if count[k] > 0:
                metrics[f"ce_{k + 1}"] = ce[k] / count[k]
                metrics[f"accuracy_{k + 1}"] = matches[k] / count[k]
                metrics[f"acceptance_{k + 1}"] = accepted[k] / count[k]
        if tau_greedy[1] > 0:
            metrics["tau_greedy"] = float(tau_greedy[0] / tau_greedy[1])
            metrics["expected_tau"] = float(tau_probabilistic[0] / tau_probabilistic[1])
        return metrics


def eagle3_position_masks(
    loss_mask: torch.Tensor, attention_mask: torch.Tensor | None, ttt_length: int
) -> torch.Tensor:
    """`(T, B, S)` float masks: step k at index q is supervised iff `loss_mask[q + k]` and position q+k+1 is a real
    token (q + k ≤ length − 2 for right-padded rows), so that its target, the next-token distribution after token
    q+k+1, exists. `loss_mask` / `attention_mask`: `(B, S)`, 1 for supervised / real tokens (None: all real)."""
    batch, seq_len = loss_mask.shape
    real = torch.ones_like(loss_mask) if attention_mask is None else attention_mask
    has_next = torch.cat([real[:, 1:], real.new_zeros(batch, 1)], dim=1)
    first = (loss_mask * has_next).float()
    masks = [first]
    for k in range(1, ttt_length):
        shift = min(k, seq_len)
        masks.append(torch.cat([first[:, shift:], first.new_zeros(batch, shift)], dim=1))
    return torch.stack(masks)


def eagle3_step_targets(target_probs: torch.Tensor, step: int) -> torch.Tensor:
    """The target distribution of TTT step `step` at every index q: `target_probs[q + step + 1]` (the target's
    distribution after token q+step+1), uniform past the end. `target_probs`: `(B, S, V)` → `(B, S, V)`."""
    batch, seq_len, vocab = target_probs.shape
    shift = min(step + 1, seq_len)
    uniform = target_probs.new_full((batch, shift, vocab), 1.0 / vocab)
    return torch.cat([target_probs[:, shift:], uniform], dim=1)


def eagle3_loss(
    step_logits: Sequence[torch.Tensor],
    target_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    step_loss_decay: float = 0.8,
    draft_vocab_ids: torch.Tensor | None = None,
) -> Eagle3LossOutput:
    """The EAGLE-3 loss of `ttt_length` steps.

    Args:
        step_logits: one `(B, S, V')` tensor per TTT step (`Eagle3DraftModel.ttt_forward(...).logits`).
        target_logits: `(B, S, V)` the target's logits at every position (soft-capped as the target does; with a
            draft the target's final hidden states give them through `draft.lm_head_logits`).
        loss_mask: `(B, S)` 1 for positions to supervise (the response tokens).
        attention_mask: `(B, S)` 1 for real tokens of right-padded rows (None: all real).
        step_loss_decay: step k's loss weighs `step_loss_decay ** k`.
        draft_vocab_ids: `(V',)` sorted ids when the logits cover a draft vocabulary only: the target distribution is
            restricted to those ids and renormalised (None: V' = V).
    """
    steps = len(step_logits)
    batch, seq_len = loss_mask.shape
    probs = torch.softmax(target_logits.float(), dim=-1)
    if draft_vocab_ids is not None:
        probs = probs[..., draft_vocab_ids]
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    masks = eagle3_position_masks(loss_mask, attention_mask, steps).to(probs.device)
    weights = torch.tensor([float(step_loss_decay) ** k for k in range(steps)], device=probs.device)
    normaliser = float(batch * seq_len)
    step_losses, row_losses, matches, overlaps = [], [], [], []
    for k, logits in enumerate(step_logits):
        target = eagle3_step_targets(probs, k)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        keep = masks[k] != 0
        rows = torch.where(keep, -(target * log_probs).sum(-1), torch.zeros((), device=probs.device))
        row_losses.append(rows)
        step_losses.append(rows.sum() / normaliser)
        with torch.no_grad():
            matches.append(((logits.argmax(-1) == target.argmax(-1)) & keep).float())
            overlaps.append((1 - 0.5 * (log_probs.exp() - target).abs().sum(-1)).clamp(0, 1) * keep)
    step_losses = torch.stack(step_losses)
    with torch.no_grad():
        matches, overlaps = torch.stack(matches), torch.stack(overlaps)
        counts = (masks != 0).flatten(1).sum(-1).float()
        accuracy = torch.stack([matches.flatten(1).sum(-1), counts], dim=-1)
        accept_rate = torch.stack([overlaps.flatten(1).sum(-1), counts], dim=-1)
        first = masks[0] != 0
        rows = first.sum().float()

        def tau(survival: torch.Tensor) -> torch.Tensor:
            return torch.stack([(torch.cumprod(survival, 0).sum(0) * first).sum() + rows, rows])

    return Eagle3LossOutput(
        loss=(step_losses * weights).sum(),
        step_losses=step_losses,
        row_losses=torch.stack(row_losses),
        position_mask=masks,
        step_weights=weights,
        accuracy=accuracy,
        accept_rate=accept_rate,
        tau_greedy=tau(matches),
        tau_probabilistic=tau(overlaps),
    )


__all__ = [
    "Eagle3LossOutput",
    "Eagle3MetricAccumulator",
    "eagle3_loss",
    "eagle3_position_masks",
    "eagle3_step_targets",
]
