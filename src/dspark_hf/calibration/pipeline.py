"""Calibrating a draft in one call: collect rounds on held-out prompts, fit, sweep and report (the work of
`dspark-hf calibrate`)."""

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..models.dspark import DSparkDraftModel
from ..targets import parse_dtype
from ..training.data import first_turn_messages, load_prompts, prompt_token_count
from .data import CalibrationData, collect_calibration_rounds
from .fitting import (
    DEFAULT_BIAS_GRID,
    DEFAULT_TEMPERATURE_GRID,
    FitMethod,
    FitObjective,
    apply_calibration,
    cross_fitted_metrics,
    fit_sequential_calibration,
)
from .metrics import DEFAULT_NUM_BINS, DEFAULT_THRESHOLDS
from .report import calibration_report, plot_reliability_diagram, plot_threshold_sweep, report_markdown

logger = logging.get_logger(__name__)

__all__ = ["CalibrationResult", "calibrate"]

ROUNDS_FILE = "calibration_rounds.json"


@dataclass
class CalibrationResult:
    """What [`calibrate`] returns: the calibrated draft (parameters applied, model card updated), the rounds (all,
    and split into those fitted on and those held out) and the report of [`calibration_report`]."""

    draft: DSparkDraftModel
    data: CalibrationData
    fit_data: CalibrationData
    test_data: CalibrationData
    report: dict[str, Any]

    @property
    def markdown(self) -> str:
        """The report as markdown ([`report_markdown`])."""
        return report_markdown(self.report)

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Writes the calibrated draft (`draft/`), `metrics.json`, `report.md` and, when matplotlib is installed, the
        reliability diagrams and the threshold sweep as PNGs; returns the draft's folder."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.draft.save_pretrained(out / "draft")
        (out / "metrics.json").write_text(json.dumps(self.report, indent=2), encoding="utf-8")
        (out / "report.md").write_text(self.markdown, encoding="utf-8")
        evaluation = self.test_data if self.report["evaluation_split"] == "test" else self.fit_data
        try:
            for kind in ("survival", "conditional"):
                plot_reliability_diagram(
                    evaluation,
                    self.report["temperatures"],
                    out / f"reliability_{kind}.png",
                    kind=kind,
                    num_bins=min(self.report["num_bins"], 10),
                    biases=self.report["biases"],
                )
            plot_threshold_sweep(self.report["threshold_sweep"]["calibrated"], out / "threshold_sweep.png")
        except ImportError as error:
            logger.warning("Note: no plots (%s).", error)
        return out / "draft"


def _short_conversations(
    prompts: Sequence[dict], tokenizer, limit: int | None, max_prompt_tokens: int | None
) -> list[list[dict]]:
    """The first-turn chats of the first `limit` prompts whose templated length is at most `max_prompt_tokens`."""
    kept, skipped = [], 0
    for prompt in prompts:
        messages = first_turn_messages(prompt)
        if max_prompt_tokens is not None and prompt_token_count(tokenizer, messages) > max_prompt_tokens:
            skipped += 1
            continue
        kept.append(messages)
        if len(kept) == limit:
            break
    if skipped:
        logger.warning("Skipped %d prompts longer than %d tokens (max_prompt_tokens).", skipped, max_prompt_tokens)
    return kept


def calibrate(
    target: PreTrainedModel | None,
    draft: DSparkDraftModel | str | os.PathLike,
    prompts: str | os.PathLike | Sequence[dict] | None = None,
    *,
    tokenizer=None,
    draft_dtype: str | torch.dtype = "auto",
    rounds: CalibrationData | str | os.PathLike | None = None,
    limit: int | None = 100,
    shuffle: bool = False,
    exclude: Any = None,
    max_prompt_tokens: int | None = 1024,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    cross_fit: int = 0,
    method: FitMethod = "sts",
    objective: FitObjective = "ece",
    num_bins: int = DEFAULT_NUM_BINS,
    grid: Sequence[float] = DEFAULT_TEMPERATURE_GRID,
    bias_grid: Sequence[float] = DEFAULT_BIAS_GRID,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    settings: Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Calibrates `draft`'s confidence head for `target` (paper §3.2.1) and reports the result.

    `draft` is a model attached to `target`, or a saved draft (either layout) to load onto it in `draft_dtype`
    ("auto": as saved).

    1. Rounds: `rounds` recorded earlier ([`CalibrationData`] or its JSON file; no target needed), else collected
       by [`collect_calibration_rounds`] on the first turns of `prompts` (a JSONL path, a dataset or prompt dicts, as
       [`load_prompts`] reads them, shuffled with `seed` when `shuffle`, minus `exclude`), the first `limit` of them
       at most `max_prompt_tokens` long with `tokenizer`'s chat template, decoded with `max_new_tokens`,
       `do_sample`, `temperature`, `top_p` and `top_k`.
    2. The rounds are split by prompt ([`CalibrationData.split`], `test_fraction` held out, `seed`) and
       [`fit_sequential_calibration`] fits `method` (`"sts"` or `"sts_bias"`) by `objective` (`"ece"` or
       `"log_loss"`) over `grid` (and `bias_grid`) with `num_bins` bins.
    3. [`calibration_report`] measures before and after on both splits and sweeps `thresholds`; `cross_fit` K > 0
       adds K-fold cross-fitted metrics over all rounds; `settings` (e.g. the command line) are stored as
       `report["settings"]`.
    4. The parameters are applied to `draft` ([`apply_calibration`]) and recorded in its model card.

    With `output_dir`, collected rounds are saved there as soon as they are recorded (`calibration_rounds.json`, for
    a later refit with `rounds=`) and the result at the end ([`CalibrationResult.save`]).
    """
    out = None if output_dir is None else Path(output_dir)
    source = None
    if not isinstance(draft, DSparkDraftModel):
        source = str(draft)
        dtype = parse_dtype(draft_dtype) if isinstance(draft_dtype, str) else draft_dtype
        draft = DSparkDraftModel.from_pretrained(draft, target_model=target, dtype=dtype).eval()
    if rounds is not None:
        data = rounds if isinstance(rounds, CalibrationData) else CalibrationData.load(rounds)
    else:
        if target is None or prompts is None:
            raise ValueError("Pass `target` and `prompts` to collect calibration rounds, or `rounds` recorded earlier.")
        loaded = load_prompts(prompts, shuffle=shuffle, seed=seed, exclude=exclude)
        conversations = _short_conversations(loaded, tokenizer, limit, max_prompt_tokens)
        data = collect_calibration_rounds(
            target, draft, conversations, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, progress=progress,
        )
        if isinstance(prompts, (str, os.PathLike)):
            data.metadata["prompts"] = str(prompts)
        if source is not None:
            data.metadata["draft"] = source
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            data.save(out / ROUNDS_FILE)
    if data.block_size != draft.config.block_size:
        raise ValueError(
            f"The rounds have block size {data.block_size} but the draft's is {draft.config.block_size}: calibrate "
            "with rounds recorded for this draft."
        )
    fit_data, test_data = data.split(test_fraction, seed)
    if not fit_data.num_rounds:
        raise ValueError("No rounds to fit on: give more prompts or a smaller test_fraction.")
    temperatures, biases = fit_sequential_calibration(fit_data, method, grid, bias_grid, objective, num_bins)
    report = calibration_report(
        fit_data, test_data, temperatures, num_bins, thresholds, biases=biases,
        fit={"method": method, "objective": objective},
    )
    if cross_fit:
        report["cross_fitted"] = cross_fitted_metrics(
            data, cross_fit, seed, num_bins, method=method, grid=grid, bias_grid=bias_grid, objective=objective
        )
    if settings is not None:
        report["settings"] = dict(settings)
    apply_calibration(draft, temperatures, biases)
    draft.model_card_data.add_calibration(report)
    result = CalibrationResult(draft, data, fit_data, test_data, report)
    if out is not None:
        result.save(out)
    return result
