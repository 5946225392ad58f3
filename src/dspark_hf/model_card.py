"""Model cards of DSpark drafts: README.md, written by `DSparkDraftModel.save_pretrained` and `push_to_hub`.

As in peft, the card is created or updated. Its YAML metadata gets `library_name: dspark_hf`, `base_model`,
`pipeline_tag`, tags and the structured [`DSparkModelCardData`] (under the `dspark_hf` key, which is how
`from_pretrained` → `save_pretrained` keeps it). The body's generated section, between two HTML comments, is
rewritten from the draft's config and card data; text outside it is kept. Numbers appear only where they were
recorded: a section without data says "not recorded".
"""

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.utils import cached_file

if TYPE_CHECKING:
    from .models.dspark.modeling_dspark import DSparkDraftModel

MODEL_CARD_NAME = "README.md"
LIBRARY_NAME = "dspark_hf"
CARD_DATA_KEY = "dspark_hf"
DEFAULT_TAGS = ("speculative-decoding", "dspark", "draft-model")
SECTION_START = (
    "<!-- dspark_hf model card: this section is rewritten by save_pretrained; text outside it is kept -->"
)
SECTION_END = "<!-- end of the dspark_hf model card section -->"
# push_to_hub puts the Hub's README.md in the upload folder, or transformers' placeholder card (this line).
_TRANSFORMERS_PLACEHOLDER = "This model card has been automatically generated."
# Keys of a `dspark_hf.evaluation.evaluate` summary that the card keeps, with their column titles.
EVALUATION_COLUMNS = {
    "tau": "τ",
    "turns": "turns",
    "new_tokens": "new tokens",
    "speedup_vs_plain": "× plain `generate`",
    "greedy_identical": "greedy output identical",
}
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@dataclass
class DSparkModelCardData:
    """What a draft's model card reports beyond its config.

    Args:
        base_model: the target's Hub id or path (set by `DSparkDraftModel.from_target`).
        training_data: free-text description of the training data.
        training_steps: optimizer steps of the training run (set by `DSparkTrainer.train`).
        seed: seed of the training run (set by `DSparkTrainer.train`).
        evaluation: `{dataset: {"tau": ..., ...}}`; see [`~DSparkModelCardData.add_evaluation`].
        evaluation_settings: decoding settings of the evaluation, e.g. `{"do_sample": False}`.
        calibration: T_k (and b_k) and ECE before/after per position; see [`~DSparkModelCardData.add_calibration`].
        notes: free text, shown at the end of the card.
    """

    base_model: str | None = None
    training_data: str | None = None
    training_steps: int | None = None
    seed: int | None = None
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation_settings: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    notes: str | None = None

    def add_evaluation(self, results: Iterable[Mapping[str, Any]], **settings) -> None:
        """Records the per-dataset summaries returned by `dspark_hf.evaluation.evaluate`.

        `settings` are the decoding settings of that run (e.g. `max_new_tokens=256, do_sample=False`).
        """
        for summary in results:
            self.evaluation[summary["dataset"]] = {
                key: summary[key] for key in EVALUATION_COLUMNS if summary.get(key) is not None
            }
        self.evaluation_settings.update(settings)

    def add_calibration(self, report: Mapping[str, Any]) -> None:
        """Records a `dspark_hf.calibration.calibration_report`: per position, T_k (and b_k when the report has
        biases) and the ECE of the prefix survival before and after calibration, on the report's evaluation split."""
        name = report["evaluation_split"]
        split = report["splits"][name]
        before, after = split["before"]["positions"], split["after"]["positions"]
        biases = report.get("biases")
        self.calibration = {
            "split": name,
            "rounds": split["rounds"],
            "num_bins": report["num_bins"],
            "positions": [
                {
                    "position": k + 1,
                    "temperature": report["temperatures"][k],
                    **({} if biases is None else {"bias": biases[k]}),
                    "count": b["survival"]["count"],
                    "ece_before": b["survival"]["ece"],
                    "ece_after": a["survival"]["ece"],
                }
                for k, (b, a) in enumerate(zip(before, after, strict=True))
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields (unset and empty ones left out)."""
        return {key: value for key, value in asdict(self).items() if value is not None and value != {}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DSparkModelCardData":
        """Inverse of [`to_dict`]; keys it does not know are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names and value is not None})


# ----------------------------------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------------------------------


def load_model_card_data(path: str | os.PathLike, **kwargs) -> DSparkModelCardData:
    """The card data stored in the README.md of a local or Hub checkpoint (empty when there is none)."""
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    resolved = cached_file(
        str(path),
        MODEL_CARD_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if resolved is None:
        return DSparkModelCardData()
    data = ModelCard.load(resolved, ignore_metadata_errors=True).data.to_dict().get(CARD_DATA_KEY)
    return DSparkModelCardData.from_dict(data) if isinstance(data, Mapping) else DSparkModelCardData()


def save_model_card(
    draft: "DSparkDraftModel", directory: str | os.PathLike, model_id: str | None = None, layout: str = "hf"
) -> ModelCard:
    """Creates or updates `<directory>/README.md` with [`build_model_card`] and returns the card."""
    path = Path(directory) / MODEL_CARD_NAME
    existing = ModelCard.load(path, ignore_metadata_errors=True) if path.exists() else None
    card = build_model_card(draft, existing, model_id=model_id, layout=layout)
    card.save(path)
    return card


def build_model_card(
    draft: "DSparkDraftModel",
    existing: ModelCard | None = None,
    model_id: str | None = None,
    layout: str = "hf",
) -> ModelCard:
    """The card of `draft`, updating `existing` (a card dspark_hf wrote or one written by hand) when given.

    The metadata of `existing` is kept (tags are merged). Its generated section is replaced; a card without
    one gets it appended, except transformers' placeholder card, which is replaced. `model_id` is the path or
    Hub id shown in the usage snippet.
    """
    data = draft.model_card_data
    metadata = existing.data.to_dict() if existing is not None else {}
    tags = list(metadata.get("tags") or [])
    tags += [tag for tag in (*DEFAULT_TAGS, *(draft.model_tags or [])) if tag not in tags]
    metadata.update(library_name=LIBRARY_NAME, pipeline_tag="text-generation", tags=tags)
    if _is_hub_id(data.base_model):
        metadata["base_model"] = data.base_model
    metadata[CARD_DATA_KEY] = data.to_dict()

    section = f"{SECTION_START}\n\n{model_card_section(draft, model_id, layout)}\n{SECTION_END}\n"
    text = existing.text if existing is not None else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + (f"\n{tail}" if tail else "")
    elif text.strip() and _TRANSFORMERS_PLACEHOLDER not in text:
        text = f"{text.rstrip()}\n\n{section}"
    else:
        text = f"\n{section}"
    return ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{text}")


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` can be a Hub repository id (the Hub rejects local paths as `base_model`)."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _items(items: list[tuple[str, Any]]) -> list[str]:
    return [f"- {name}: {value}" for name, value in items]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def model_card_section(draft: "DSparkDraftModel", model_id: str | None = None, layout: str = "hf") -> str:
    """The generated markdown: description, usage, architecture, training, τ and calibration."""
    config, data = draft.config, draft.model_card_data
    target = data.base_model
    storage = (
        "This checkpoint, in the reference (DeepSpec) layout served by vLLM and SGLang, also stores copies."
        if layout == "deepspec"
        else "This checkpoint does not store them: attach the target when loading."
    )
    lines = [
        f"# DSpark draft for {f'`{target}`' if target else 'a causal LM target'}",
        "",
        f"A speculative-decoding draft model for the `{LIBRARY_NAME}` library. Each round it drafts "
        f"γ = {config.block_size} tokens at once from hidden states of the target, and the target verifies "
        "them, so the output is the target's own. The draft reuses the target's token embedding and LM head. "
        + storage,
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from dspark_hf import DSparkDraftModel",
        "",
        f'target = AutoModelForCausalLM.from_pretrained("{target or "<target model>"}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{target or "<target model>"}")',
        f'draft = DSparkDraftModel.from_pretrained("{model_id or "<this draft>"}", target_model=target)',
        'inputs = tokenizer("Hello!", return_tensors="pt")',
        "output = target.generate(**inputs, assistant_model=draft, max_new_tokens=128)",
        "```",
        "",
        "## Architecture",
        "",
    ]
    own = sum(
        p.numel() for n, p in draft.named_parameters() if not n.startswith(("embed_tokens.", "lm_head."))
    )
    temperatures, biases = config.calibration_temperatures, config.calibration_biases
    head = f"{config.markov_head_type} (rank {config.markov_rank})" if config.has_sequential_head else "none"
    lines += _items(
        [
            ("block size γ", config.block_size),
            ("draft layers", config.num_hidden_layers),
            *([] if config.draft_architecture == "qwen3" else [("layer design", f"`{config.draft_architecture}`")]),
            ("sequential head", head),
            ("confidence head", "yes" if config.confidence_head else "no"),
            ("target layers (`target_layer_ids`)", ", ".join(map(str, config.target_layer_ids))),
            ("`mask_token_id`", config.mask_token_id),
            (
                "calibration temperatures",
                "none" if temperatures is None else ", ".join(f"{t:.3f}" for t in temperatures),
            ),
            *([] if biases is None else [("calibration biases", ", ".join(f"{b:+.3f}" for b in biases))]),
            (
                "draft vocabulary",
                "whole vocabulary"
                if config.draft_vocab_size is None
                else f"{config.draft_vocab_size:,} of {config.vocab_size:,} tokens (`draft_vocab_ids`)",
            ),
            ("draft parameters (without the target's)", f"{own:,}"),
            ("checkpoint layout", layout),
        ]
    )
    lines += ["", "## Training", ""]
    training = [("data", data.training_data), ("steps", data.training_steps), ("seed", data.seed)]
    training = [(name, value) for name, value in training if value is not None]
    lines += _items(training) if training else ["Not recorded."]

    lines += ["", "## Evaluation", ""]
    if data.evaluation:
        columns = [key for key in EVALUATION_COLUMNS if any(key in row for row in data.evaluation.values())]
        rows = [[name] + [_number(row.get(key)) for key in columns] for name, row in data.evaluation.items()]
        lines += [
            "τ: tokens gained per target forward pass (accepted drafted tokens + 1), over all rounds.",
            "",
        ]
        lines += _table(["dataset"] + [EVALUATION_COLUMNS[key] for key in columns], rows)
        if data.evaluation_settings:
            settings = ", ".join(f"`{key}={value!r}`" for key, value in data.evaluation_settings.items())
            lines += ["", f"Settings: {settings}."]
    else:
        lines.append("Not recorded.")

    if config.confidence_head:
        lines += ["", "## Calibration", ""]
        calibration = data.calibration
        if calibration:
            with_bias = all("bias" in p for p in calibration["positions"])
            fitted = (
                "Temperatures T_k and biases b_k (c_k = σ(z_k / T_k + b_k)) fitted by Sequential Temperature "
                "Scaling with a per-position bias"
                if with_bias
                else "Temperatures T_k fitted by Sequential Temperature Scaling"
            )
            lines += [
                f"{fitted}. ECE of the prefix survival over {calibration['num_bins']} bins, on the "
                f"{calibration['split']} split ({calibration['rounds']} rounds).",
                "",
            ]
            rows = [
                [str(p["position"]), f"{p['temperature']:.3f}"]
                + ([f"{p['bias']:+.3f}"] if with_bias else [])
                + [str(p["count"]), _percent(p["ece_before"]), _percent(p["ece_after"])]
                for p in calibration["positions"]
            ]
            header = ["k", "T_k"] + (["b_k"] if with_bias else []) + ["samples", "ECE before", "ECE after"]
            lines += _table(header, rows)
            if temperatures is None:
                lines += [
                    "",
                    "These temperatures are not applied to this draft (`calibration_temperatures` is unset).",
                ]
            elif with_bias and biases is None:
                lines += ["", "These biases are not applied to this draft (`calibration_biases` is unset)."]
        elif temperatures is not None or biases is not None:
            lines.append("Calibration as above; ECE before and after calibration not recorded.")
        else:
            lines.append("Not calibrated.")

    if data.notes:
        lines += ["", "## Notes", "", data.notes.strip()]
    return "\n".join(lines) + "\n"


__all__ = [
    "DSparkModelCardData",
    "build_model_card",
    "load_model_card_data",
    "model_card_section",
    "save_model_card",
]
