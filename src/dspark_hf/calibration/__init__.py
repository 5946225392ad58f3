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
  recorded rounds (Fig. 5); the `plot_*` helpers draw the reliability diagram (Fig. 6), the sweep and a cost table.

Positions are 1-based in names and docs (k = 1..γ) and 0-based in arrays.
"""

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.utils import logging

from ..models.dspark.modeling_dspark import DSparkDraftModel
from ..scheduling import CostTable, StaticThresholdPolicy
from ..serialization import JsonFileMixin, parse_document
from ..speculative.stats import SpeculationStats
from ..targets import chat_input_ids

CALIBRATION_DATA_FORMAT = "dspark_hf.calibration_data"
CALIBRATION_DATA_VERSION = 1
# Equal-width confidence bins for ECE and reliability diagrams (Guo et al., 2017 use 15).
DEFAULT_NUM_BINS = 15
# 261 temperatures from 0.05 to 20, log-spaced in steps of 10^0.01 (≈2.3%), including exactly 1.0.
DEFAULT_TEMPERATURE_GRID = tuple(float(10.0 ** (e / 100)) for e in range(-130, 131))
# 49 biases from −6 to 6 in steps of 0.25: the coarse bias grid of `method="sts_bias"`, refined around its optimum.
DEFAULT_BIAS_GRID = tuple(i / 4 for i in range(-24, 25))
DEFAULT_THRESHOLDS = tuple(i / 10 for i in range(10))
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

ConfidenceKind = Literal["conditional", "survival"]
FitMethod = Literal["sts", "sts_bias"]
FitObjective = Literal["ece", "log_loss"]
Prompt = torch.Tensor | str | Sequence[Mapping[str, str]]


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CalibrationRound:
    """One verification round: `proposed` drafted tokens were verified and the first `accepted` survived.

    `confidence_logits[k]` is the raw confidence logit of drafted token k+1. Token k+1 ≤ `accepted` was accepted,
    token `accepted`+1 (if verified) was rejected, later ones were never reached. `prompt_index` names the prompt.
    """

    proposed: int
    accepted: int
    confidence_logits: list[float]
    prompt_index: int = 0

    def __post_init__(self):
        if not 0 <= self.accepted <= self.proposed:
            raise ValueError(f"accepted ({self.accepted}) must lie in [0, proposed={self.proposed}].")
        if len(self.confidence_logits) != self.proposed:
            raise ValueError(
                f"A round that verified {self.proposed} tokens needs {self.proposed} confidence logits, got "
                f"{len(self.confidence_logits)}."
            )


@dataclass
class CalibrationData(JsonFileMixin):
    """Recorded rounds of full-block verification, the input of STS, the metrics and the threshold sweep."""

    block_size: int
    rounds: list[CalibrationRound] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}.")
        for r in self.rounds:
            self._check(r)

    def _check(self, round_: CalibrationRound) -> None:
        if round_.proposed > self.block_size:
            raise ValueError(
                f"A round verified {round_.proposed} tokens but block_size is {self.block_size}."
            )

    def add_round(self, round_: CalibrationRound) -> None:
        self._check(round_)
        self.rounds.append(round_)

    def add_stats(self, stats: SpeculationStats, prompt_index: int = 0) -> None:
        """Appends the rounds of one `generate()` call (`draft.last_generate_stats`)."""
        if any(stats.looked_up):
            raise ValueError(
                "These rounds come from generate(..., prompt_lookup_num_tokens=...): some verified looked-up tokens "
                "that the confidence head never scored. Collect calibration rounds without prompt_lookup_num_tokens."
            )
        if stats.block_size != self.block_size:
            raise ValueError(
                f"Stats of block size {stats.block_size} added to data of block size {self.block_size}."
            )
        for proposed, accepted, logits in zip(
            stats.proposed, stats.accepted, stats.confidence_logits, strict=True
        ):
            if proposed and not logits:
                raise ValueError(
                    "The rounds carry no confidence logits: the draft has no confidence head to calibrate."
                )
            self.add_round(CalibrationRound(proposed, accepted, list(logits), prompt_index))

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(logits (N, γ) with NaN where not verified, proposed (N,), accepted (N,))` as float64/int64 arrays."""
        logits = np.full((len(self.rounds), self.block_size), np.nan)
        for i, r in enumerate(self.rounds):
            logits[i, : r.proposed] = r.confidence_logits
        proposed = np.array([r.proposed for r in self.rounds], dtype=np.int64)
        accepted = np.array([r.accepted for r in self.rounds], dtype=np.int64)
        return logits, proposed, accepted

    def split(self, test_fraction: float, seed: int = 0) -> tuple["CalibrationData", "CalibrationData"]:
        """`(fit, test)` split by prompt (rounds of one prompt are correlated), `test_fraction` of the prompts."""
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
        prompts = self._shuffled_prompts(seed)
        test = set(prompts[: round(test_fraction * len(prompts))])
        return self._with_prompts(set(prompts) - test), self._with_prompts(test)

    def folds(self, num_folds: int, seed: int = 0) -> list["CalibrationData"]:
        """The rounds in `num_folds` groups by prompt, prompt counts differing by at most one (shuffled with `seed`)."""
        prompts = self._shuffled_prompts(seed)
        if not 2 <= num_folds <= len(prompts):
            raise ValueError(f"num_folds must be between 2 and the number of prompts ({len(prompts)}), got {num_folds}.")
        return [self._with_prompts(set(prompts[i::num_folds])) for i in range(num_folds)]

    def _shuffled_prompts(self, seed: int) -> list[int]:
        prompts = sorted({r.prompt_index for r in self.rounds})
        random.Random(seed).shuffle(prompts)
        return prompts

    def _with_prompts(self, prompts: set[int]) -> "CalibrationData":
        """The rounds of `prompts` (in their order), with this data's block size and metadata."""
        return CalibrationData(
            self.block_size, [r for r in self.rounds if r.prompt_index in prompts], dict(self.metadata)
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CALIBRATION_DATA_FORMAT,
                "version": CALIBRATION_DATA_VERSION,
                "block_size": self.block_size,
                "metadata": self.metadata,
                "rounds": [asdict(r) for r in self.rounds],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "CalibrationData":
        data = parse_document(text, CALIBRATION_DATA_FORMAT, CALIBRATION_DATA_VERSION)
        rounds = [CalibrationRound(**r) for r in data["rounds"]]
        return cls(data["block_size"], rounds, data.get("metadata", {}))


@torch.no_grad()
def collect_calibration_rounds(
    target: PreTrainedModel,
    draft: DSparkDraftModel,
    prompts: Sequence[Prompt],
    tokenizer=None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    generation_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> CalibrationData:
    """Generates for every prompt with full-block verification and records each round's outcome.

    The draft's `verification_policy` is set to None for the duration, so every round verifies the whole drafted
    block (less only near `max_length`); it is restored afterwards. Calibrate in the decoding mode you serve:
    greedy acceptance (draft token = target argmax) and sampled acceptance (min(1, p_t/p_d)) differ.

    Args:
        prompts: token-id tensors (`(length,)` or `(1, length)`), user messages (str) or chat message lists; text
            is rendered with `tokenizer`'s chat template (generation prompt added).
        do_sample, temperature, top_p, top_k: decoding settings (unset ones keep the target's generation config).
        seed: seeds `torch` before generating (matters when sampling).
        generation_kwargs: any other `generate()` arguments.
        progress: show a progress bar.
    """
    if draft.confidence_head is None:
        raise ValueError(
            "This draft has no confidence head (confidence_head=False): there is nothing to calibrate."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")

    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    kwargs.update(
        {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    )
    if (
        tokenizer is not None
        and tokenizer.eos_token_id is not None
        and target.generation_config.pad_token_id is None
    ):
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    kwargs.update(generation_kwargs or {})
    data = CalibrationData(
        draft.config.block_size,
        metadata={
            "target": getattr(target.config, "name_or_path", "") or type(target).__name__,
            "draft": getattr(draft.config, "name_or_path", ""),
            "num_prompts": len(prompts),
            "seed": seed,
            "generation": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))},
        },
    )
    policy = draft.verification_policy
    draft.verification_policy = None
    torch.manual_seed(seed)
    try:
        for index, prompt in enumerate(tqdm(prompts, desc="calibration rounds", disable=not progress)):
            input_ids = chat_input_ids(tokenizer, prompt, target.device)
            target.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=draft, **kwargs
            )
            data.add_stats(draft.last_generate_stats, prompt_index=index)
    finally:
        draft.verification_policy = policy
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


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


def expected_calibration_error(confidences, outcomes, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """ECE = Σ_b (n_b/N)·|accuracy_b − mean confidence_b| over `num_bins` equal-width bins (Naeini et al., 2015)."""
    p, y = _binary_inputs(confidences, outcomes)
    bins = _bin_index(p, num_bins)
    gap = np.bincount(bins, weights=p, minlength=num_bins) - np.bincount(bins, weights=y, minlength=num_bins)
    return float(np.abs(gap).sum() / p.size)


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


def _parameters(
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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ


def _calibrated(
    data: CalibrationData, temperatures: Sequence[float] | None, biases: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(c (N, γ) = σ(z / T + b), NaN where not verified; proposed; accepted)` of the recorded rounds."""
    logits, proposed, accepted = data.arrays()
    t, b = _parameters(data.block_size, temperatures, biases)
    return _sigmoid(logits / t + b), proposed, accepted


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
    if kind not in ("conditional", "survival"):
        raise ValueError(f"kind must be 'conditional' or 'survival', got {kind!r}.")
    c, proposed, accepted = _calibrated(data, temperatures, biases)
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
    t, b = _parameters(data.block_size, temperatures, biases)
    per_kind = {kind: position_samples(data, kind, temperatures, biases) for kind in _KINDS}
    return {
        "num_bins": num_bins,
        "temperatures": t.tolist(),
        "biases": None if biases is None else b.tolist(),
        **_metrics_of_samples(per_kind, num_bins),
    }


_KINDS = ("conditional", "survival")


def _metrics_of_samples(per_kind: Mapping[str, list[tuple[np.ndarray, np.ndarray]]], num_bins: int) -> dict[str, Any]:
    """`{"positions": [...], "mean": {...}}` of [`calibration_metrics`] from per-kind, per-position samples."""
    positions = [
        {"position": k + 1, **{kind: _summary(*per_kind[kind][k], num_bins) for kind in _KINDS}}
        for k in range(len(per_kind["survival"]))
    ]
    mean = {}
    for kind in _KINDS:
        mean[kind] = {}
        for metric in ("ece", "auroc", "brier"):
            values = [p[kind][metric] for p in positions if p[kind][metric] is not None]
            mean[kind][metric] = float(np.mean(values)) if values else None
    return {"positions": positions, "mean": mean}


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
        samples.append({kind: position_samples(fold, kind, temperatures, biases) for kind in _KINDS})
    pooled = {
        kind: [
            tuple(np.concatenate([fold[kind][k][part] for fold in samples]) for part in (0, 1))
            for k in range(data.block_size)
        ]
        for kind in _KINDS
    }
    return {
        "folds": num_folds,
        "seed": seed,
        "rounds": data.num_rounds,
        "prompts": len({r.prompt_index for r in data.rounds}),
        "parameters": parameters,
        "before": calibration_metrics(data, None, num_bins),
        "after": {"num_bins": num_bins, **_metrics_of_samples(pooled, num_bins)},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Sequential Temperature Scaling
# ----------------------------------------------------------------------------------------------------------------------


def _grid_ece(candidates: np.ndarray, y: np.ndarray, num_bins: int) -> np.ndarray:
    """ECE of every row of `candidates` `(G, n)` against outcomes `y` `(n,)`."""
    grid_size, n = candidates.shape
    bins = _bin_index(candidates, num_bins) + num_bins * np.arange(grid_size)[:, None]
    size = grid_size * num_bins
    gap = np.bincount(bins.ravel(), weights=candidates.ravel(), minlength=size) - np.bincount(
        bins.ravel(), weights=np.broadcast_to(y, candidates.shape).ravel(), minlength=size
    )
    return np.abs(gap.reshape(grid_size, num_bins)).sum(axis=1) / n


def _grid_objective(
    candidates: np.ndarray, y: np.ndarray, objective: FitObjective, num_bins: int
) -> np.ndarray:
    """`objective` (ECE or mean log loss) of every row of `candidates` `(G, n)` against outcomes `y` `(n,)`."""
    if objective == "ece":
        return _grid_ece(candidates, y, num_bins)
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
                prefix * _sigmoid(z / t[i : i + chunk] + b[i : i + chunk]), y, objective, num_bins
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
        survival[rows] = prefix * _sigmoid(z / t + b)
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
    t, b = _parameters(draft.config.block_size, temperatures, biases)
    draft.config.calibration_temperatures = t.tolist()
    draft.config.calibration_biases = None if biases is None else b.tolist()
    return draft


# ----------------------------------------------------------------------------------------------------------------------
# Static threshold sweep (Fig. 5)
# ----------------------------------------------------------------------------------------------------------------------


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
    confidences, proposed, accepted = _calibrated(data, temperatures, biases)
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


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


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
    t, b = _parameters(fit_data.block_size, temperatures, biases)
    return {
        "temperatures": t.tolist(),
        "biases": None if biases is None else b.tolist(),
        "fit": dict(fit or {}),
        "num_bins": num_bins,
        "evaluation_split": evaluation,
        "splits": {
            name: {
                "rounds": data.num_rounds,
                "prompts": len({r.prompt_index for r in data.rounds}),
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


# ----------------------------------------------------------------------------------------------------------------------
# Plots (need matplotlib: pip install "dspark_hf[plots]")
# ----------------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError('Plots need matplotlib: pip install matplotlib (or "dspark_hf[plots]").') from error
    return Figure(figsize=(width, height), layout="constrained")


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
    figure = _figure(3.2 * columns, 3.2 * rows)
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
    figure = _figure(6.0, 3.6)
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


def plot_cost_table(
    tables: CostTable | Mapping[str, CostTable], path: str | os.PathLike, title: str | None = None
) -> None:
    """Plots SPS(B) (left) and the forward time relative to the row's first B (right) of one or several labelled
    cost tables, one line per context length or number of requests (B = R · width); raw measurements as markers,
    the smoothed curve as a line when the table is smoothed."""
    if isinstance(tables, CostTable):
        tables = {tables.metadata.get("shape", "table"): tables}
    figure = _figure(9.0, 3.6)
    sps_ax, cost_ax = figure.subplots(1, 2)
    ticks = set()
    for label, table in tables.items():
        for i, (row, raw) in enumerate(zip(table.rows, table.raw_rows, strict=True)):
            name, tokens = label, table.batch_tokens
            if table.context_lengths is not None:
                name = f"{label}, context {table.context_lengths[i]}"
            if table.requests is not None:
                name = f"{label}, {table.requests[i]} request(s)"
                tokens = [table.requests[i] * width for width in table.batch_tokens]
            ticks.update(tokens)
            line = sps_ax.plot(tokens, raw, marker="o", ls="-" if table.smooth == "none" else ":", label=name)[0]
            if table.smooth != "none":
                sps_ax.plot(tokens, row, color=line.get_color(), label=f"{name} ({table.smooth})")
            cost_ax.plot(tokens, [raw[0] / v for v in raw], marker="o", color=line.get_color(), label=name)
    sps_ax.set(xscale="log", xlabel="B (tokens per target forward)", ylabel="SPS (forwards / s)")
    cost_ax.set(xscale="log", xlabel="B (tokens per target forward)", ylabel="forward time / time at first B")
    ticks = sorted(ticks)
    for ax in (sps_ax, cost_ax):
        ax.set_xticks(ticks, labels=[str(b) for b in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title or "Target cost table", fontsize=10)
    figure.savefig(path, dpi=120)


__all__ = [
    "CalibrationData",
    "CalibrationRound",
    "DEFAULT_BIAS_GRID",
    "DEFAULT_NUM_BINS",
    "DEFAULT_TEMPERATURE_GRID",
    "DEFAULT_THRESHOLDS",
    "FIT_METHODS",
    "FIT_OBJECTIVES",
    "apply_calibration",
    "auroc",
    "brier_score",
    "calibration_metrics",
    "calibration_report",
    "cross_fitted_metrics",
    "collect_calibration_rounds",
    "expected_calibration_error",
    "fit_sequential_calibration",
    "fit_sequential_temperature_scaling",
    "plot_cost_table",
    "plot_reliability_diagram",
    "plot_threshold_sweep",
    "position_samples",
    "reliability_bins",
    "report_markdown",
    "threshold_sweep",
]
