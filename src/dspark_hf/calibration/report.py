"""Calibration reports: metrics before and after calibration with the threshold sweep ([`calibration_report`]),
their Markdown summary ([`report_markdown`]), and the reliability diagram (Fig. 6) and threshold-sweep (Fig. 5)
plots (need matplotlib: pip install "dspark_hf[plots]")."""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..scheduling.plots import new_figure
from .data import CalibrationData
from .metrics import (
    DEFAULT_NUM_BINS,
    DEFAULT_THRESHOLDS,
    ConfidenceKind,
    auroc,
    calibration_metrics,
    calibration_parameters,
    expected_calibration_error,
    position_samples,
    reliability_bins,
    threshold_sweep,
)


def calibration_report(
    fit_data: CalibrationData,
    test_data: CalibrationData | None,
    temperatures: Sequence[float],
    num_bins: int = DEFAULT_NUM_BINS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    biases: Sequence[float] | None = None,
    fit: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics before (T = 1, no bias) and after calibration (`temperatures`, `biases`) on the fit rounds and,
    when given and non-empty, on held-out test rounds, plus the threshold sweep (raw and calibrated confidences)
    on the evaluation rounds (test if available, else fit). `fit` describes how the parameters were fitted
    (e.g. `{"method": "sts_bias", "objective": "ece"}`); it is stored and shown by [`report_markdown`]."""
    splits = {"fit": fit_data}
    if test_data is not None and test_data.num_rounds:
        splits["test"] = test_data
    evaluation = "test" if "test" in splits else "fit"
    t, b = calibration_parameters(fit_data.block_size, temperatures, biases)
    return {
        "temperatures": t.tolist(),
        "biases": None if biases is None else b.tolist(),
        "fit": dict(fit or {}),
        "num_bins": num_bins,
        "evaluation_split": evaluation,
        "splits": {
            name: {
                "rounds": data.num_rounds,
                "prompts": data.num_prompts,
                "before": calibration_metrics(data, None, num_bins),
                "after": calibration_metrics(data, temperatures, num_bins, biases=biases),
            }
            for name, data in splits.items()
        },
        "threshold_sweep": {
            "raw": threshold_sweep(splits[evaluation], thresholds),
            "calibrated": threshold_sweep(splits[evaluation], thresholds, temperatures, biases),
        },
    }


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_line(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    return (
        f"Mean over positions: survival ECE {_percent(before['survival']['ece'])} → "
        f"{_percent(after['survival']['ece'])}, conditional ECE {_percent(before['conditional']['ece'])} → "
        f"{_percent(after['conditional']['ece'])}, survival Brier {_number(before['survival']['brier'])} → "
        f"{_number(after['survival']['brier'])}."
    )


def report_markdown(report: Mapping[str, Any]) -> str:
    """Markdown summary of a [`calibration_report`]."""
    evaluation = report["evaluation_split"]
    split = report["splits"][evaluation]
    counts = ", ".join(
        f"{name}: {s['rounds']} rounds from {s['prompts']} prompts" for name, s in report["splits"].items()
    )
    biases = report.get("biases")
    fit = ", ".join(f"`{key}={value}`" for key, value in report.get("fit", {}).items())
    lines = [
        "# Confidence calibration (Sequential Temperature Scaling"
        + (" with a per-position bias, c_k = σ(z_k / T_k + b_k))" if biases is not None else ")"),
        "",
        f"Rounds — {counts}. {'Temperatures and biases' if biases is not None else 'Temperatures'} fitted on the "
        f"fit split{f' ({fit})' if fit else ''}; metrics below on the **{evaluation}** split. "
        f'ECE over {report["num_bins"]} equal-width bins. Survival a_k = ∏_{{i≤k}} c_i against "tokens 1..k all '
        'accepted" (what STS calibrates and the scheduler uses); conditional c_k against "token k accepted" over '
        "rounds whose first k−1 tokens were accepted. Spread: standard deviation of a_k (near 0: the confidences "
        "no longer tell rounds apart).",
        "",
        f"| k | T_k | {'b_k | ' if biases is not None else ''}n (survival) | survival ECE before → after | "
        "spread before → after | AUROC | Brier before → after | n (conditional) | conditional ECE before → after |",
        "|---:|---:|" + ("---:|" if biases is not None else "") + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, (before, after) in enumerate(
        zip(split["before"]["positions"], split["after"]["positions"], strict=True)
    ):
        sb, sa, cb, ca = before["survival"], after["survival"], before["conditional"], after["conditional"]
        bias = f"{biases[k]:+.3f} | " if biases is not None else ""
        lines.append(
            f"| {k + 1} | {report['temperatures'][k]:.3f} | {bias}{sb['count']} | "
            f"{_percent(sb['ece'])} → {_percent(sa['ece'])} | {_number(sb['std_confidence'])} → "
            f"{_number(sa['std_confidence'])} | {_number(sb['auroc'])} | {_number(sb['brier'])} → "
            f"{_number(sa['brier'])} | {cb['count']} | {_percent(cb['ece'])} → {_percent(ca['ece'])} |"
        )
    lines += ["", _mean_line(split["before"]["mean"], split["after"]["mean"])]
    cross = report.get("cross_fitted")
    if cross:
        lines += [
            "",
            f"## Cross-fitted: {cross['folds']} folds by prompt, every round scored out of sample",
            "",
            f"All {cross['rounds']} rounds from {cross['prompts']} prompts: the prompts are split into {cross['folds']} "
            "groups, each group's rounds are calibrated with parameters fitted on the other groups (same method and "
            "objective), and the metrics pool all rounds.",
            "",
            "| k | n (survival) | survival ECE before → after | Brier before → after | n (conditional) | "
            "conditional ECE before → after |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for k, (before, after) in enumerate(
            zip(cross["before"]["positions"], cross["after"]["positions"], strict=True)
        ):
            sb, sa, cb, ca = before["survival"], after["survival"], before["conditional"], after["conditional"]
            lines.append(
                f"| {k + 1} | {sb['count']} | {_percent(sb['ece'])} → {_percent(sa['ece'])} | "
                f"{_number(sb['brier'])} → {_number(sa['brier'])} | {cb['count']} | "
                f"{_percent(cb['ece'])} → {_percent(ca['ece'])} |"
            )
        lines += ["", _mean_line(cross["before"]["mean"], cross["after"]["mean"])]
    lines += [
        "",
        "## Static threshold sweep (calibrated c_k, replayed on the recorded rounds)",
        "",
        "| threshold | tokens / step | accepted | rejected | acceptance rate | τ |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["threshold_sweep"]["calibrated"]:
        lines.append(
            f"| {s['threshold']:.2f} | {s['tokens_per_step']:.2f} | {s['accepted_per_step']:.2f} | "
            f"{s['rejected_per_step']:.2f} | {_percent(s['acceptance_rate'])} | {s['tau']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_reliability_diagram(
    data: CalibrationData,
    temperatures: Sequence[float] | None,
    path: str | os.PathLike,
    kind: ConfidenceKind = "survival",
    positions: Sequence[int] | None = None,
    num_bins: int = 10,
    *,
    biases: Sequence[float] | None = None,
) -> None:
    """Reliability diagram (paper Fig. 6): observed rate against mean confidence per equal-width bin.

    One panel per position (1-based `positions`; default every position with samples, at most 4 per row), with
    the raw confidences ("before", T = 1) and the calibrated ones ("after", σ(z / T + b) with `temperatures` and
    `biases`; omitted when both are None), ECE and AUROC in the title, and the sample counts per bin as a shaded
    background histogram.
    """
    before = position_samples(data, kind)
    calibrated = temperatures is not None or biases is not None
    after = position_samples(data, kind, temperatures, biases) if calibrated else None
    if positions is None:
        positions = [k + 1 for k, (p, _) in enumerate(before) if p.size]
    if not positions:
        raise ValueError("No position has samples to plot.")
    if any(not 1 <= k <= data.block_size for k in positions):
        raise ValueError(f"positions must lie in 1..{data.block_size}, got {list(positions)}.")
    columns = min(4, len(positions))
    rows = math.ceil(len(positions) / columns)
    figure = new_figure(3.2 * columns, 3.2 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    centers = (np.arange(num_bins) + 0.5) / num_bins
    for ax, k in zip(axes, positions, strict=False):
        p, y = before[k - 1]
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="Perfect calibration")
        if p.size == 0:
            ax.set_title(f"Position {k}: no samples", fontsize=9)
            continue
        histogram = ax.twinx()
        counts = reliability_bins(p if after is None else after[k - 1][0], y, num_bins)["count"]
        histogram.bar(centers, counts, width=1 / num_bins, color="tab:blue", alpha=0.12)
        histogram.set_yticks([])
        ax.set_zorder(histogram.get_zorder() + 1)
        ax.patch.set_visible(False)
        title = f"Position {k}\nECE {100 * expected_calibration_error(p, y, num_bins):.1f}%"
        series = [("Before calibration", p, "tab:red")]
        if after is not None:
            series.append(("After calibration", after[k - 1][0], "tab:green"))
            title += f" → {100 * expected_calibration_error(after[k - 1][0], y, num_bins):.1f}%"
        area = auroc(p, y)
        title += f", AUC {area:.3f}" if area is not None else ""
        for label, scores, color in series:
            stats = reliability_bins(scores, y, num_bins)
            points = [
                (c, a)
                for c, a in zip(stats["mean_confidence"], stats["accuracy"], strict=True)
                if c is not None
            ]
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, color=color, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Predicted acceptance", ylabel="Observed acceptance")
        ax.set_title(title, fontsize=9)
    for ax in axes[len(positions) :]:
        ax.set_visible(False)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    quantity = "prefix survival ∏ c_i" if kind == "survival" else "conditional confidence c_k"
    figure.suptitle(f"Reliability diagram of the {quantity} ({num_bins} bins)", fontsize=10)
    figure.savefig(path, dpi=120)


def plot_threshold_sweep(
    sweep: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str | None = None
) -> None:
    """Confidence-threshold sweep (paper Fig. 5): accepted and rejected verified tokens per step (stacked bars)
    and the acceptance rate (line), from [`threshold_sweep`]."""
    figure = new_figure(6.0, 3.6)
    ax = figure.subplots()
    x = np.arange(len(sweep))
    accepted = [s["accepted_per_step"] for s in sweep]
    rejected = [s["rejected_per_step"] for s in sweep]
    ax.bar(x, accepted, color="tab:blue", label="Accepted tokens")
    ax.bar(
        x, rejected, bottom=accepted, color="white", edgecolor="tab:blue", hatch="//", label="Rejected tokens"
    )
    ax.set(xticks=x, xlabel="Confidence threshold", ylabel="Avg. tokens per step")
    ax.set_xticklabels([f"{s['threshold']:.2f}".rstrip("0").rstrip(".") for s in sweep])
    rate_ax = ax.twinx()
    rates = [np.nan if s["acceptance_rate"] is None else 100 * s["acceptance_rate"] for s in sweep]
    rate_ax.plot(x, rates, color="tab:orange", marker="o", label="Acceptance rate")
    for i in (0, len(sweep) - 1):
        if not np.isnan(rates[i]):
            rate_ax.annotate(
                f"{rates[i]:.1f}%",
                (x[i], rates[i]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    rate_ax.set(ylim=(0, 110), ylabel="Acceptance rate (%)")
    handles = ax.get_legend_handles_labels()[0] + rate_ax.get_legend_handles_labels()[0]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    ax.set_title(title or "Static confidence-threshold sweep", fontsize=10)
    figure.savefig(path, dpi=120)
