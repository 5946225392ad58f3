"""Calibration metrics of recorded rounds: ECE, reliability bins, AUROC and Brier score, per block position, of the
conditional confidence c_k and of the prefix survival a_k = ∏_{i≤k} c_i, and the static threshold sweep (Fig. 5)
replayed on the rounds."""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ..scheduling import StaticThresholdPolicy
from .data import CalibrationData

# Equal-width confidence bins for ECE and reliability diagrams (Guo et al., 2017 use 15).
DEFAULT_NUM_BINS = 15
DEFAULT_THRESHOLDS = tuple(i / 10 for i in range(10))
CONFIDENCE_KINDS = ("conditional", "survival")

ConfidenceKind = Literal["conditional", "survival"]


def _binary_inputs(confidences, outcomes) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(confidences, dtype=np.float64).ravel()
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} confidences but {y.size} outcomes.")
    if p.size == 0:
        raise ValueError("No samples: calibration metrics need at least one (confidence, outcome) pair.")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("Confidences must be probabilities in [0, 1].")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("Outcomes must be 0/1 (or booleans).")
    return p, y


def _bin_index(p: np.ndarray, num_bins: int) -> np.ndarray:
    """Equal-width bins [0, 1/M), …, [(M−1)/M, 1]: confidence 1.0 falls in the last bin."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
    return np.minimum((p * num_bins).astype(np.int64), num_bins - 1)


def binned_ece(candidates: np.ndarray, y: np.ndarray, num_bins: int) -> np.ndarray:
    """ECE of every row of `candidates` `(G, n)` against outcomes `y` `(n,)`, shape `(G,)` (inputs not checked)."""
    grid_size, n = candidates.shape
    bins = _bin_index(candidates, num_bins) + num_bins * np.arange(grid_size)[:, None]
    size = grid_size * num_bins
    gap = np.bincount(bins.ravel(), weights=candidates.ravel(), minlength=size) - np.bincount(
        bins.ravel(), weights=np.broadcast_to(y, candidates.shape).ravel(), minlength=size
    )
    return np.abs(gap.reshape(grid_size, num_bins)).sum(axis=1) / n


def expected_calibration_error(confidences, outcomes, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """ECE = Σ_b (n_b/N)·|accuracy_b − mean confidence_b| over `num_bins` equal-width bins (Naeini et al., 2015)."""
    p, y = _binary_inputs(confidences, outcomes)
    return float(binned_ece(p[None, :], y, num_bins)[0])


def reliability_bins(confidences, outcomes, num_bins: int = DEFAULT_NUM_BINS) -> dict[str, list]:
    """Per equal-width bin: `count`, `mean_confidence` and `accuracy` (None for empty bins), and the bin `edges`."""
    p, y = _binary_inputs(confidences, outcomes)
    bins = _bin_index(p, num_bins)
    counts = np.bincount(bins, minlength=num_bins)
    sum_p = np.bincount(bins, weights=p, minlength=num_bins)
    sum_y = np.bincount(bins, weights=y, minlength=num_bins)
    return {
        "edges": [b / num_bins for b in range(num_bins + 1)],
        "count": counts.tolist(),
        "mean_confidence": [float(s / c) if c else None for s, c in zip(sum_p, counts, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(sum_y, counts, strict=True)],
    }


def auroc(confidences, outcomes) -> float | None:
    """Area under the ROC curve (Mann–Whitney; ties count ½); None when only one class occurs."""
    p, y = _binary_inputs(confidences, outcomes)
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(p.size)
    # Average rank (1-based) of each group of tied confidences.
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    ends = np.r_[starts[1:], p.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def brier_score(confidences, outcomes) -> float:
    """Mean squared error between confidence and the 0/1 outcome."""
    p, y = _binary_inputs(confidences, outcomes)
    return float(np.mean((p - y) ** 2))


def calibration_parameters(
    block_size: int, temperatures: Sequence[float] | None, biases: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated `(T, b)` arrays of shape `(block_size,)`; T = 1 and b = 0 where None."""
    t = np.ones(block_size) if temperatures is None else np.asarray(temperatures, dtype=np.float64).ravel()
    b = np.zeros(block_size) if biases is None else np.asarray(biases, dtype=np.float64).ravel()
    for name, values in (("temperatures", t), ("biases", b)):
        if values.shape != (block_size,):
            raise ValueError(f"Need {block_size} {name} (one per block position), got {values.size}.")
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"Temperatures must be finite and > 0, got {t.tolist()}.")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"Biases must be finite, got {b.tolist()}.")
    return t, b


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) elementwise."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ


def calibrated_confidences(
    data: CalibrationData, temperatures: Sequence[float] | None, biases: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(c (N, γ) = σ(z / T + b), NaN where not verified; proposed; accepted)` of the recorded rounds."""
    logits, proposed, accepted = data.arrays()
    t, b = calibration_parameters(data.block_size, temperatures, biases)
    return sigmoid(logits / t + b), proposed, accepted


def position_samples(
    data: CalibrationData,
    kind: ConfidenceKind = "survival",
    temperatures: Sequence[float] | None = None,
    biases: Sequence[float] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position k: `(confidences, outcomes)` with c_i = σ(z_i / T_i + b_i) (T = 1, b = 0 where None).

    - `"conditional"`: c_k against "token k accepted", over rounds where token k was verified and its prefix
      survived (rounds that rejected an earlier token never reached k and are left out).
    - `"survival"`: a_k = ∏_{i≤k} c_i against "tokens 1..k all accepted", over rounds that verified ≥ k tokens.
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"kind must be 'conditional' or 'survival', got {kind!r}.")
    c, proposed, accepted = calibrated_confidences(data, temperatures, biases)
    scores = c if kind == "conditional" else np.cumprod(np.nan_to_num(c, nan=1.0), axis=1)
    samples = []
    for k in range(data.block_size):
        rows = proposed > k
        if kind == "conditional":
            rows &= accepted >= k
        samples.append((scores[rows, k], (accepted[rows] > k).astype(np.float64)))
    return samples


def _summary(p: np.ndarray, y: np.ndarray, num_bins: int) -> dict[str, Any]:
    keys = ("mean_confidence", "std_confidence", "accuracy", "ece", "auroc", "brier")
    if p.size == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    return {
        "count": int(p.size),
        "mean_confidence": float(p.mean()),
        "std_confidence": float(p.std()),
        "accuracy": float(y.mean()),
        "ece": expected_calibration_error(p, y, num_bins),
        "auroc": auroc(p, y),
        "brier": brier_score(p, y),
    }


def metrics_of_samples(per_kind: Mapping[str, list[tuple[np.ndarray, np.ndarray]]], num_bins: int) -> dict[str, Any]:
    """`{"positions": [...], "mean": {...}}` of [`calibration_metrics`] from per-kind, per-position samples."""
    positions = [
        {"position": k + 1, **{kind: _summary(*per_kind[kind][k], num_bins) for kind in CONFIDENCE_KINDS}}
        for k in range(len(per_kind["survival"]))
    ]
    mean = {}
    for kind in CONFIDENCE_KINDS:
        mean[kind] = {}
        for metric in ("ece", "auroc", "brier"):
            values = [p[kind][metric] for p in positions if p[kind][metric] is not None]
            mean[kind][metric] = float(np.mean(values)) if values else None
    return {"positions": positions, "mean": mean}


def calibration_metrics(
    data: CalibrationData,
    temperatures: Sequence[float] | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    *,
    biases: Sequence[float] | None = None,
) -> dict[str, Any]:
    """ECE, AUROC and Brier score per position, of the conditional confidence and of the prefix survival, with
    c_k = σ(z_k / T_k + b_k) (T = 1, b = 0 where None).

    Returns `{"num_bins", "temperatures", "biases", "positions": [{"position": k, "conditional": {...},
    "survival": {...}}], "mean": {"conditional": {...}, "survival": {...}}}`; each inner dict holds `count`,
    `mean_confidence`, `std_confidence` (spread: near 0 means the confidences no longer tell rounds apart),
    `accuracy` (observed rate), `ece`, `auroc`, `brier` (None where there are no samples or, for AUROC, one
    class). `mean` is the unweighted mean over positions that have a value.
    """
    t, b = calibration_parameters(data.block_size, temperatures, biases)
    per_kind = {kind: position_samples(data, kind, temperatures, biases) for kind in CONFIDENCE_KINDS}
    return {
        "num_bins": num_bins,
        "temperatures": t.tolist(),
        "biases": None if biases is None else b.tolist(),
        **metrics_of_samples(per_kind, num_bins),
    }


def threshold_sweep(
    data: CalibrationData,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    temperatures: Sequence[float] | None = None,
    biases: Sequence[float] | None = None,
) -> list[dict[str, float]]:
    """Replays `StaticThresholdPolicy(threshold)` on the recorded rounds (those that verified ≥ 1 token).

    Each round is truncated before its first conditional confidence c_k < threshold (c_k = σ(z_k / T_k + b_k),
    T = 1 and b = 0 where None). With full-block collection the outcome of every kept position is known: a
    truncated round of length ℓ accepts min(accepted, ℓ) tokens. The replay is per round: it does not model how
    a different truncation would change later rounds. Per threshold: `tokens_per_step` (verified drafted tokens
    per round), `accepted_per_step`, `rejected_per_step` (verified but not accepted: the rejected token and
    those after it), `acceptance_rate` (accepted / verified; None when nothing is verified) and `tau`
    (accepted + 1 per round, the target's bonus/correction token included).
    """
    confidences, proposed, accepted = calibrated_confidences(data, temperatures, biases)
    rows = proposed > 0
    if not rows.any():
        raise ValueError("No round verified any token: nothing to sweep.")
    confidences = confidences[rows]
    rows_list = [c[:n].tolist() for c, n in zip(confidences, proposed[rows], strict=True)]
    accepted = accepted[rows]
    sweep = []
    for threshold in thresholds:
        lengths = np.array(StaticThresholdPolicy(threshold).select_lengths(rows_list))
        kept = np.minimum(accepted, lengths)
        verified = int(lengths.sum())
        sweep.append(
            {
                "threshold": float(threshold),
                "rounds": int(rows.sum()),
                "tokens_per_step": float(lengths.mean()),
                "accepted_per_step": float(kept.mean()),
                "rejected_per_step": float((lengths - kept).mean()),
                "acceptance_rate": float(kept.sum() / verified) if verified else None,
                "tau": float(kept.mean() + 1.0),
            }
        )
    return sweep

