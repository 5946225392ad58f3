"""Fitting the calibration: Sequential Temperature Scaling (paper §3.2.1) and its per-position bias extension by
grid search, storing the result in a draft ([`apply_calibration`]), and cross-fitted out-of-sample metrics."""

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from transformers.utils import logging

from ..models.dspark.modeling_dspark import DSparkDraftModel
from .data import CalibrationData
from .metrics import (
    CONFIDENCE_KINDS,
    DEFAULT_NUM_BINS,
    binned_ece,
    calibration_metrics,
    calibration_parameters,
    metrics_of_samples,
    position_samples,
    sigmoid,
)

# 261 temperatures from 0.05 to 20, log-spaced in steps of 10^0.01 (≈2.3%), including exactly 1.0.
DEFAULT_TEMPERATURE_GRID = tuple(float(10.0 ** (e / 100)) for e in range(-130, 131))
# 49 biases from −6 to 6 in steps of 0.25: the coarse bias grid of `method="sts_bias"`, refined around its optimum.
DEFAULT_BIAS_GRID = tuple(i / 4 for i in range(-24, 25))
FIT_METHODS = ("sts", "sts_bias")
FIT_OBJECTIVES = ("ece", "log_loss")
# Cap on grid × samples evaluated at once by the grid search (memory bound).
_GRID_CHUNK_ELEMENTS = 4_000_000
# `sts_bias` searches every 5th temperature of the grid × the bias grid, then refines: the grid's temperatures
# between the coarse optimum's neighbours × 41 biases between its neighbours on the bias grid.
_COARSE_TEMPERATURE_STRIDE = 5
_REFINED_BIASES = 41
# Confidences are clipped to [ε, 1 − ε] in the log loss.
_LOG_LOSS_EPS = 1e-12

logger = logging.get_logger(__name__)

FitMethod = Literal["sts", "sts_bias"]
FitObjective = Literal["ece", "log_loss"]


def _grid_objective(
    candidates: np.ndarray, y: np.ndarray, objective: FitObjective, num_bins: int
) -> np.ndarray:
    """`objective` (ECE or mean log loss) of every row of `candidates` `(G, n)` against outcomes `y` `(n,)`."""
    if objective == "ece":
        return binned_ece(candidates, y, num_bins)
    a = np.clip(candidates, _LOG_LOSS_EPS, 1.0 - _LOG_LOSS_EPS)
    return -(y * np.log(a) + (1.0 - y) * np.log1p(-a)).mean(axis=1)


def _grid_search(
    z: np.ndarray,
    y: np.ndarray,
    prefix: np.ndarray,
    temperatures: np.ndarray,
    biases: np.ndarray,
    objective: FitObjective,
    num_bins: int,
) -> tuple[float, float]:
    """The `(T, b)` of the grid `temperatures × biases` minimising `objective` of prefix · σ(z / T + b) against `y`.

    Ties go to the pair closest to (1, 0) in |log T| + |b|.
    """
    t, b = (v.ravel() for v in np.meshgrid(temperatures, biases, indexing="ij"))
    order = np.argsort(np.abs(np.log(t)) + np.abs(b), kind="stable")
    t, b = t[order, None], b[order, None]
    chunk = max(1, _GRID_CHUNK_ELEMENTS // z.size)
    scores = np.concatenate(
        [
            _grid_objective(
                prefix * sigmoid(z / t[i : i + chunk] + b[i : i + chunk]), y, objective, num_bins
            )
            for i in range(0, t.size, chunk)
        ]
    )
    best = int(np.argmin(scores))
    return float(t[best, 0]), float(b[best, 0])


def _refined_grids(
    temperatures: np.ndarray, biases: np.ndarray, t: float, b: float
) -> tuple[np.ndarray, np.ndarray]:
    """Around the coarse optimum `(t, b)` of the sorted grids: the temperatures between t's neighbours on the
    coarse temperature grid, and `_REFINED_BIASES` biases between b's neighbours on the bias grid (b included)."""
    i, j = int(np.searchsorted(temperatures, t)), int(np.searchsorted(biases, b))
    stride = _COARSE_TEMPERATURE_STRIDE
    low, high = biases[max(j - 1, 0)], biases[min(j + 1, biases.size - 1)]
    fine_biases = np.union1d(np.linspace(low, high, _REFINED_BIASES), [b])
    return temperatures[max(i - stride, 0) : i + stride + 1], fine_biases


def _sorted_grid(values: Sequence[float], name: str, positive: bool) -> np.ndarray:
    grid = np.sort(np.asarray(values, dtype=np.float64).ravel())
    valid = np.isfinite(grid) & (grid > 0) if positive else np.isfinite(grid)
    if grid.size == 0 or not valid.all():
        kind = "finite, positive" if positive else "finite"
        raise ValueError(f"The {name} grid must be a non-empty sequence of {kind} values.")
    return grid


def fit_sequential_calibration(
    data: CalibrationData,
    method: FitMethod = "sts",
    grid: Sequence[float] = DEFAULT_TEMPERATURE_GRID,
    bias_grid: Sequence[float] = DEFAULT_BIAS_GRID,
    objective: FitObjective = "ece",
    num_bins: int = DEFAULT_NUM_BINS,
) -> tuple[list[float], list[float] | None]:
    """Sequential calibration of the confidence head: `(temperatures, biases)`, one per block position.

    For k = 1..γ in order, with the parameters of positions 1..k−1 fixed at their fitted values, a grid search
    picks the parameters of position k minimising `objective` of the prefix survival ∏_{i≤k} c_i against
    "tokens 1..k all accepted" (rounds that verified ≥ k tokens). Positions that no round verified get T = 1,
    b = 0; a value on the edge of its grid is logged as a warning.

    - `method="sts"`: Sequential Temperature Scaling (paper §3.2.1), c_k = σ(z_k / T_k), a 1-D search over
      `grid`; `biases` is None. Keeps the order of the confidences at each position.
    - `method="sts_bias"` (beyond the paper): c_k = σ(z_k / T_k + b_k), a 2-D search over every 5th value of
      `grid` × `bias_grid`, then over the `grid` values between the optimum's neighbours × biases in steps of
      1/20 of the bias grid's between its neighbours. A bias moves the mean confidence, which a temperature
      cannot. With `bias_grid=[0.0]` it is exactly `"sts"` (biases all 0).
    - `objective="ece"` (the paper's) over `num_bins` equal-width bins, or `"log_loss"` (mean negative
      log-likelihood). ECE ignores how well the confidences separate rounds: with a free bias it favours a nearly
      constant confidence equal to the observed rate (large T), which the log loss does not.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}.")
    if objective not in FIT_OBJECTIVES:
        raise ValueError(f"objective must be one of {FIT_OBJECTIVES}, got {objective!r}.")
    temperatures = _sorted_grid(grid, "temperature", positive=True)
    biases = _sorted_grid(bias_grid, "bias", positive=False) if method == "sts_bias" else np.zeros(1)
    refine = biases.size > 1
    # With biases, a coarse pass first (every 5th temperature, the largest included), then a refined one.
    first_temperatures = (
        np.union1d(temperatures[::_COARSE_TEMPERATURE_STRIDE], temperatures[-1:]) if refine else temperatures
    )
    logits, proposed, accepted = data.arrays()
    survival = np.ones(len(proposed))
    fitted_t, fitted_b = [], []
    for k in range(data.block_size):
        rows = proposed > k
        if not rows.any():
            fitted_t.append(1.0)
            fitted_b.append(0.0)
            continue
        z, y, prefix = logits[rows, k], (accepted[rows] > k).astype(np.float64), survival[rows]
        t, b = _grid_search(z, y, prefix, first_temperatures, biases, objective, num_bins)
        if t in (temperatures[0], temperatures[-1]):
            hint = "consider widening it"
            if refine and objective == "ece" and t == temperatures[-1]:
                hint = "the ECE fit is flattening c_k towards a constant; objective='log_loss' keeps it informative"
            logger.warning(f"{method}: T_{k + 1} = {t:g} lies on the edge of the temperature grid; {hint}.")
        if refine:
            if b in (biases[0], biases[-1]):
                logger.warning(
                    f"{method}: b_{k + 1} = {b:g} lies on the edge of the bias grid; consider widening it."
                )
            t, b = _grid_search(
                z, y, prefix, *_refined_grids(temperatures, biases, t, b), objective, num_bins
            )
        fitted_t.append(t)
        fitted_b.append(b)
        survival[rows] = prefix * sigmoid(z / t + b)
    return fitted_t, fitted_b if method == "sts_bias" else None


def fit_sequential_temperature_scaling(
    data: CalibrationData,
    grid: Sequence[float] = DEFAULT_TEMPERATURE_GRID,
    num_bins: int = DEFAULT_NUM_BINS,
) -> list[float]:
    """Sequential Temperature Scaling (paper §3.2.1): one temperature per block position.

    For k = 1..γ in order, a 1-D search over `grid` picks the T_k minimising the ECE of the prefix survival
    ∏_{i≤k} σ(z_i / T_i) against "tokens 1..k all accepted" (rounds that verified ≥ k tokens), with T_1..T_{k−1}
    fixed at their fitted values. Ties go to the temperature closest to 1 (a temperature on the grid's edge is
    logged as a warning). Positions that no round verified get T = 1. Temperature scaling keeps the order of
    the confidences at each position, so their (conditional) AUROC is unchanged. Same as
    `fit_sequential_calibration(data, "sts", grid, num_bins=num_bins)[0]`.
    """
    return fit_sequential_calibration(data, "sts", grid, num_bins=num_bins)[0]


def apply_calibration(
    draft: DSparkDraftModel, temperatures: Sequence[float], biases: Sequence[float] | None = None
) -> DSparkDraftModel:
    """Stores fitted temperatures and biases in `draft.config.calibration_temperatures` and
    `calibration_biases` (saved and loaded with the draft; biases None clears earlier ones).

    Generation then computes c_k = σ(z_k / T_k + b_k) (`draft.calibrated_confidence`), so verification policies
    and the scheduler see calibrated confidences.
    """
    t, b = calibration_parameters(draft.config.block_size, temperatures, biases)
    draft.config.calibration_temperatures = t.tolist()
    draft.config.calibration_biases = None if biases is None else b.tolist()
    return draft


def cross_fitted_metrics(
    data: CalibrationData,
    num_folds: int = 2,
    seed: int = 0,
    num_bins: int = DEFAULT_NUM_BINS,
    **fit_kwargs,
) -> dict[str, Any]:
    """Out-of-sample metrics of a calibration fit over every round, by K-fold cross-fitting on prompts.

    The prompts are split into `num_folds` groups ([`CalibrationData.folds`]); each group's rounds are calibrated
    with parameters fitted ([`fit_sequential_calibration`] with `fit_kwargs`, e.g. `method="sts"`) on the other
    groups only, and the metrics are computed over all rounds pooled. Every confidence is thus scored out of
    sample, as with a single held-out split, but on `num_folds` times as many rounds, which lowers the sampling
    noise of ECE. Returns `{"folds", "seed", "rounds", "prompts", "parameters": [{"temperatures", "biases"} per
    fold], "before": calibration_metrics(data), "after": {"num_bins", "positions", "mean"}}`.
    """
    folds = data.folds(num_folds, seed)
    parameters, samples = [], []
    for i, fold in enumerate(folds):
        rest = CalibrationData(data.block_size, [r for j, f in enumerate(folds) if j != i for r in f.rounds])
        temperatures, biases = fit_sequential_calibration(rest, num_bins=num_bins, **fit_kwargs)
        parameters.append({"temperatures": temperatures, "biases": biases})
        samples.append({kind: position_samples(fold, kind, temperatures, biases) for kind in CONFIDENCE_KINDS})
    pooled = {
        kind: [
            tuple(np.concatenate([fold[kind][k][part] for fold in samples]) for part in (0, 1))
            for k in range(data.block_size)
        ]
        for kind in CONFIDENCE_KINDS
    }
    return {
        "folds": num_folds,
        "seed": seed,
        "rounds": data.num_rounds,
        "prompts": data.num_prompts,
        "parameters": parameters,
        "before": calibration_metrics(data, None, num_bins),
        "after": {"num_bins": num_bins, **metrics_of_samples(pooled, num_bins)},
    }
