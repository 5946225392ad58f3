"""Calibration data: the recorded verification rounds of full-block generation ([`CalibrationRound`],
[`CalibrationData`]) and [`collect_calibration_rounds`], which records them."""

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..models.dspark.modeling_dspark import DSparkDraftModel
from ..serialization import JsonFileMixin, parse_document
from ..speculative.stats import SpeculationStats
from ..targets import chat_input_ids

CALIBRATION_DATA_FORMAT = "dspark_hf.calibration_data"
CALIBRATION_DATA_VERSION = 1

Prompt = torch.Tensor | str | Sequence[Mapping[str, str]]


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
        """Appends the rounds of one `generate()` call (its output's `speculation_stats`)."""
        if any(stats.looked_up) or any(stats.seeded):
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

    @property
    def num_prompts(self) -> int:
        """Number of distinct prompts the rounds come from."""
        return len({r.prompt_index for r in self.rounds})

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

    No verification policy is passed, so every round verifies the whole drafted block (less only near
    `max_length`), whatever the draft is served with. Calibrate in the decoding mode you serve:
    greedy acceptance (draft token = target argmax) and sampled acceptance (min(1, p_t/p_d)) differ.

    Args:
        prompts: token-id tensors (`(length,)` or `(1, length)`), user messages (str) or chat message lists; text
            is rendered with `tokenizer`'s chat template (generation prompt added).
        do_sample, temperature, top_p, top_k: decoding settings (unset ones keep the target's generation config).
        seed: seeds `torch` before generating (matters when sampling).
        generation_kwargs: any other `generate()` arguments (a `verification_policy` among them is refused: it would
            hide the outcome of the positions it does not verify).
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
    if kwargs.get("verification_policy") is not None:
        raise ValueError(
            "Calibration rounds verify whole blocks so that every position's outcome is seen; drop "
            "verification_policy from generation_kwargs."
        )
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
    torch.manual_seed(seed)
    for index, prompt in enumerate(tqdm(prompts, desc="calibration rounds", disable=not progress)):
        input_ids = chat_input_ids(tokenizer, prompt, target.device)
        out = target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=draft, return_dict_in_generate=True,
            **kwargs,
        )
        data.add_stats(out.speculation_stats, prompt_index=index)
    return data
