"""DSpark training objective (paper §3.3, eq. 8–12) as pure functions, plus running metric sums.

Every tensor here is laid out per block: `(..., γ, ...)` where `...` indexes blocks (e.g. `(batch, num_blocks)`)
and the γ axis is the block position k = 1..γ. A boolean `valid` mask `(..., γ)` says which positions carry a
label; invalid positions contribute nothing to any loss or metric.

Scale of the distribution-matching term. We use the total variation distance

    TV_k = ½ ‖p_d^k − p_t^k‖₁  ∈ [0, 1],

so that 1 − TV_k is exactly the expected acceptance probability of position k (Leviathan et al., 2023) and the
confidence target is c*_k = 1 − TV_k (paper eq. 8). Paper eq. 10 writes the loss with the plain L1 norm
‖p_d − p_t‖₁ = 2·TV; with our convention `tv_loss_weight=0.9` is therefore the same as α_tv = 1.8 in the paper's
literal notation. Pass `tv_loss_weight=1.8` for the literal form.

Normalisation. Each term is a position-weighted mean over valid positions,

    L_term = Σ w_k · m_k · ℓ_k / Σ w_k · m_k,     w_k = exp(−(k−1)/g),

so CE stays in nats, TV and the BCE on their natural scales, and the total is
L = α_ce·L_ce + α_tv·L_tv + α_conf·L_conf (eq. 12).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .metrics import RunningSums

__all__ = [
    "DSparkLossOutput",
    "DSparkMetricAccumulator",
    "cross_entropy_per_position",
    "dspark_loss",
    "expected_acceptance_length",
    "position_weights",
    "total_variation",
    "confidence_bce",
    "weighted_mean",
]


def position_weights(block_size: int, decay: float, device=None) -> torch.Tensor:
    """w_k = exp(−(k−1)/g) for k = 1..γ, shape `(γ,)`."""
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / decay)


def total_variation(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """TV(p_d, p_t) = ½ Σ_v |softmax(draft)_v − softmax(target)_v| over the last axis, in float32.

    `(..., V)`, `(..., V)` → `(...)`, values in [0, 1]. Gradients flow into `draft_logits` only if the target
    logits are detached (they normally come from a frozen target under `no_grad`).
    """
    p_draft = torch.softmax(draft_logits.float(), dim=-1)
    p_target = torch.softmax(target_logits.float(), dim=-1)
    return 0.5 * (p_draft - p_target).abs().sum(dim=-1)


def cross_entropy_per_position(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """−log softmax(logits)[label] `(..., V)`, `(...)` → `(...)`, in float32."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


def confidence_bce(confidence_logits: torch.Tensor, confidence_target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of σ(logit) against the soft label c* (eq. 11), per position (no reduction)."""
    return F.binary_cross_entropy_with_logits(
        confidence_logits.float(), confidence_target.float(), reduction="none"
    )


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·v / Σ w; zero (with a gradient path) when all weights are zero."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(torch.finfo(values.dtype).tiny)


def expected_acceptance_length(acceptance: torch.Tensor) -> torch.Tensor:
    """Expected tokens per round τ = 1 + Σ_k Π_{i≤k} a_i for per-position acceptances `(..., γ)` → `(...)`.

    The leading 1 is the token the target always adds (the correction or the bonus token).
    """
    return 1.0 + torch.cumprod(acceptance, dim=-1).sum(dim=-1)


@dataclass
class DSparkLossOutput:
    """Loss of one batch and the sums behind its metrics.

    Attributes:
        loss: α_ce·ce_loss + α_tv·tv_loss + α_conf·confidence_loss (scalar, differentiable).
        ce_loss, tv_loss, confidence_loss: the position-weighted terms (differentiable; confidence_loss is zero
            when the draft has no confidence head).
        num_positions: number of valid (block, position) pairs.
        ce_count: how many of them count in CE (fewer with labels outside a draft vocabulary).
        ce_sum, tv_sum, confidence_error_sum: unweighted sums of CE (nats) over those, and of TV and |c − c*| over
            valid positions.
        acceptance_sum, acceptance_count: `(γ,)` sums of 1 − TV_k and counts of valid blocks at position k.
        tau_sum, num_full_blocks: sum of τ = 1 + Σ_k Π_{i≤k}(1 − TV_i) over blocks whose γ positions are all valid,
            and their number.
        has_confidence: whether confidence statistics are meaningful.
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    tv_loss: torch.Tensor
    confidence_loss: torch.Tensor
    num_positions: torch.Tensor
    ce_count: torch.Tensor
    ce_sum: torch.Tensor
    tv_sum: torch.Tensor
    confidence_error_sum: torch.Tensor
    acceptance_sum: torch.Tensor
    acceptance_count: torch.Tensor
    tau_sum: torch.Tensor
    num_full_blocks: torch.Tensor
    has_confidence: bool = False

    def statistics(self) -> torch.Tensor:
        """All additive statistics as one float32 vector (for a single all-reduce across processes)."""
        scalars = torch.stack(
            [
                self.num_positions,
                self.ce_count,
                self.ce_sum,
                self.tv_sum,
                self.confidence_error_sum,
                self.tau_sum,
                self.num_full_blocks,
                self.ce_loss.detach() * self.num_positions,
                self.tv_loss.detach() * self.num_positions,
                self.confidence_loss.detach() * self.num_positions,
            ]
        ).float()
        return torch.cat([scalars, self.acceptance_sum.float(), self.acceptance_count.float()])

    @property
    def metrics(self) -> dict[str, float]:
        """Means of this batch alone (see [`DSparkMetricAccumulator`] for running means)."""
        accumulator = DSparkMetricAccumulator(block_size=self.acceptance_sum.shape[-1])
        accumulator.add(self.statistics(), has_confidence=self.has_confidence)
        return accumulator.compute()


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.LongTensor,
    valid: torch.Tensor,
    confidence_logits: torch.Tensor | None = None,
    *,
    ce_valid: torch.Tensor | None = None,
    ce_weight: float = 0.1,
    tv_weight: float = 0.9,
    confidence_weight: float = 1.0,
    position_decay: float = 4.0,
) -> DSparkLossOutput:
    """The DSpark objective L = α_ce·L_ce + α_tv·L_tv + α_conf·L_conf over a set of blocks.

    Args:
        draft_logits: `(..., γ, V)` teacher-forced draft logits U_k + B_k (sequential head included).
        target_logits: `(..., γ, V)` the target's logits for the same tokens (position k: the target's logits at
            sequence position p+k−1); treated as constants.
        labels: `(..., γ)` ground-truth tokens x_{p+k}.
        valid: `(..., γ)` bool, True where position k has a label.
        confidence_logits: `(..., γ)` raw confidence-head logits, or None when the draft has no confidence head.
        ce_valid: `(..., γ)` bool, the valid positions whose label counts in CE (default: all of `valid`); e.g. not
            those whose label lies outside a draft vocabulary.
        ce_weight, tv_weight, confidence_weight: α_ce, α_tv, α_conf.
        position_decay: g in w_k = exp(−(k−1)/g).
    """
    block_size = draft_logits.shape[-2]
    target_logits = target_logits.detach()
    valid = valid.bool()
    mask = valid.float()
    weights = position_weights(block_size, position_decay, device=draft_logits.device) * mask  # (..., γ)

    ce_valid = valid if ce_valid is None else valid & ce_valid.bool()
    safe_labels = torch.where(ce_valid, labels, torch.zeros_like(labels))
    ce = cross_entropy_per_position(draft_logits, safe_labels)
    tv = total_variation(draft_logits, target_logits)
    ce_loss = weighted_mean(ce, weights * ce_valid.float())
    tv_loss = weighted_mean(tv, weights)

    acceptance = (1.0 - tv).detach()
    if confidence_logits is not None:
        confidence_loss = weighted_mean(confidence_bce(confidence_logits, acceptance), weights)
        confidence_error = (torch.sigmoid(confidence_logits.detach().float()) - acceptance).abs()
        confidence_error_sum = (confidence_error * mask).sum()
    else:
        confidence_loss = ce_loss.new_zeros(())
        confidence_error_sum = ce_loss.new_zeros(())
    loss = ce_weight * ce_loss + tv_weight * tv_loss + confidence_weight * confidence_loss

    flat_mask = mask.reshape(-1, block_size)
    flat_acceptance = acceptance.reshape(-1, block_size)
    full = flat_mask.bool().all(dim=-1)
    tau = expected_acceptance_length(flat_acceptance)
    return DSparkLossOutput(
        loss=loss,
        ce_loss=ce_loss,
        tv_loss=tv_loss,
        confidence_loss=confidence_loss,
        num_positions=mask.sum(),
        ce_count=ce_valid.float().sum(),
        ce_sum=(ce.detach() * ce_valid.float()).sum(),
        tv_sum=(tv.detach() * mask).sum(),
        confidence_error_sum=confidence_error_sum,
        acceptance_sum=(flat_acceptance * flat_mask).sum(dim=0),
        acceptance_count=flat_mask.sum(dim=0),
        tau_sum=(tau * full.float()).sum(),
        num_full_blocks=full.float().sum(),
        has_confidence=confidence_logits is not None,
    )


@dataclass
class DSparkMetricAccumulator(RunningSums):
    """Running sums of [`DSparkLossOutput.statistics`] vectors → means for logging.

    Metric names: `ce` (mean CE in nats), `tv` (mean ½‖p_d − p_t‖₁), `confidence_error` (mean |c − c*|),
    `acceptance_k` for k = 1..γ (mean 1 − TV at block position k), `expected_tau` (mean over full blocks of
    1 + Σ_k Π_{i≤k}(1 − TV_i)), and the weighted objective terms `ce_loss`, `tv_loss`, `confidence_loss`.
    """

    block_size: int
    sums: torch.Tensor | None = None
    has_confidence: bool = False
    _num_scalars: int = field(default=10, init=False, repr=False)

    def add(self, statistics: torch.Tensor, has_confidence: bool = False) -> None:
        super().add(statistics)
        self.has_confidence = self.has_confidence or has_confidence

    def compute(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        s = self.sums.tolist()
        count, ce_count, ce, tv, conf_err, tau, full, ce_loss, tv_loss, conf_loss = s[: self._num_scalars]
        acc_sum = s[self._num_scalars : self._num_scalars + self.block_size]
        acc_count = s[self._num_scalars + self.block_size :]
        if count == 0:
            return {}
        metrics = {
            "ce": ce / max(ce_count, 1.0),
            "tv": tv / count,
            "ce_loss": ce_loss / count,
            "tv_loss": tv_loss / count,
        }
        if self.has_confidence:
            metrics["confidence_error"] = conf_err / count
            metrics["confidence_loss"] = conf_loss / count
        for k, (a, n) in enumerate(zip(acc_sum, acc_count, strict=True), start=1):
            if n > 0:
                metrics[f"acceptance_{k}"] = a / n
        if full > 0:
            metrics["expected_tau"] = tau / full
        return metrics
