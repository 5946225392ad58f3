"""Confidence calibration (paper §3.2.1, §4.3.3).

- [`collect_calibration_rounds`] runs `target.generate(..., assistant_model=draft)` with full-block verification
  on held-out prompts and records, for every round, the raw confidence logits of the verified positions and how
  many of them were accepted ([`CalibrationData`]).
- [`fit_sequential_temperature_scaling`] fits one temperature per block position (Sequential Temperature Scaling);
  [`fit_sequential_calibration`] also fits, with `method="sts_bias"` (beyond the paper), a bias per position,
  c_k = σ(z_k / T_k + b_k). [`apply_calibration`] stores them in `draft.config.calibration_temperatures` and
  `calibration_biases`, where generation and the scheduler pick them up through
  `DSparkDraftModel.calibrated_confidence`.
- [`calibration_metrics`] reports ECE, AUROC and Brier score per position, of the conditional confidence c_k and
  of the prefix survival a_k = ∏_{i≤k} c_i; [`threshold_sweep`] replays a static confidence threshold on the
  recorded rounds (Fig. 5); the `plot_*` helpers draw the reliability diagram (Fig. 6) and the sweep.

Positions are 1-based in names and docs (k = 1..γ) and 0-based in arrays.

Modules: `data` (rounds and their collection), `metrics` (ECE, AUROC, Brier, per-position samples, the threshold
sweep), `fitting` (STS and its bias extension, cross-fitting), `report` (report, Markdown, plots) and `pipeline`
([`calibrate`]: collect, fit, sweep and report in one call).
"""

from .data import (
    CALIBRATION_DATA_FORMAT,
    CALIBRATION_DATA_VERSION,
    CalibrationData,
    CalibrationRound,
    Prompt,
    collect_calibration_rounds,
)
from .fitting import (
    DEFAULT_BIAS_GRID,
    DEFAULT_TEMPERATURE_GRID,
    FIT_METHODS,
    FIT_OBJECTIVES,
    FitMethod,
    FitObjective,
    apply_calibration,
    cross_fitted_metrics,
    fit_sequential_calibration,
    fit_sequential_temperature_scaling,
)
from .metrics import (
    DEFAULT_NUM_BINS,
    DEFAULT_THRESHOLDS,
    ConfidenceKind,
    auroc,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    position_samples,
    reliability_bins,
    threshold_sweep,
)
from .pipeline import CalibrationResult, calibrate
from .report import calibration_report, plot_reliability_diagram, plot_threshold_sweep, report_markdown

__all__ = [
    "CALIBRATION_DATA_FORMAT",
    "CALIBRATION_DATA_VERSION",
    "CalibrationData",
    "CalibrationResult",
    "CalibrationRound",
    "ConfidenceKind",
    "DEFAULT_BIAS_GRID",
    "DEFAULT_NUM_BINS",
    "DEFAULT_TEMPERATURE_GRID",
    "DEFAULT_THRESHOLDS",
    "FIT_METHODS",
    "FIT_OBJECTIVES",
    "FitMethod",
    "FitObjective",
    "Prompt",
    "apply_calibration",
    "auroc",
    "brier_score",
    "calibrate",
    "calibration_metrics",
    "calibration_report",
    "collect_calibration_rounds",
    "cross_fitted_metrics",
    "expected_calibration_error",
    "fit_sequential_calibration",
    "fit_sequential_temperature_scaling",
    "plot_reliability_diagram",
    "plot_threshold_sweep",
    "position_samples",
    "reliability_bins",
    "report_markdown",
    "threshold_sweep",
]
