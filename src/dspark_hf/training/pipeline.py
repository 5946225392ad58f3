"""From a target and tokenized data to a trained draft in one call: the pipeline behind `dspark-hf train`,
`cache-features` and `draft-vocab`.

[`train`] builds (or continues) a draft of either family (`draft_type="dspark"` or `"eagle3"`) with
[`build_training_draft`], optionally restricts it to a draft vocabulary ([`apply_draft_vocabulary`]), wraps it in a
PEFT adapter, trains it with its family's trainer ([`DSparkTrainer`] or [`Eagle3Trainer`]) and saves it;
[`load_training_datasets`] reads and splits the data (optionally joined with a target cache built by
[`cache_target_features`]).
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..formats.deepspec import read_reference_config
from ..formats.deepspec_eagle3 import is_eagle3_deepspec_checkpoint
from ..formats.eagle import is_eagle_checkpoint
from ..models.dspark import DSparkDraftConfig, DSparkDraftModel
from ..models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from ..targets import default_target_layer_ids, parse_dtype
from .base_trainer import DraftTrainer, unwrap_draft
from .data import frequent_token_ids, load_training_dataset, vocabulary_coverage
from .eagle3_trainer import Eagle3Trainer, Eagle3TrainingArguments
from .target_cache import TargetCacheDataset, build_target_cache
from .trainer import DSparkTrainer, DSparkTrainingArguments

logger = logging.get_logger(__name__)

__all__ = [
    "DRAFT_TYPES",
    "DraftTrainingResult",
    "apply_draft_vocabulary",
    "build_training_draft",
    "cache_target_features",
    "draft_type_of",
    "latest_complete_checkpoint",
    "load_training_datasets",
    "train",
]


def load_training_datasets(
    data: str | os.PathLike,
    tokenizer=None,
    *,
    eval_data: str | os.PathLike | None = None,
    eval_fraction: float = 0.0,
    max_length: int = 2048,
    target_cache: str | os.PathLike | None = None,
    seed: int = 42,
) -> tuple[Any, Any | None]:
    """`(train_dataset, eval_dataset)` for [`train`] from tokenized data ([`load_training_dataset`]: a `save_to_disk`
    folder, or a conversations JSONL tokenized with `tokenizer` up to `max_length` tokens).

    Args:
        eval_data: held-out data in the same formats (never the benchmark prompts); without it, `eval_fraction` of
            `data` is split off (seeded with `seed`), and with neither there is no eval dataset.
        target_cache: a cache of `data`'s target features ([`cache_target_features`]): the train (and split-off
            eval) examples become [`TargetCacheDataset`]s and training runs no target forward.
    """
    train_dataset = load_training_dataset(data, tokenizer, max_length=max_length)
    eval_dataset = load_training_dataset(eval_data, tokenizer, max_length=max_length) if eval_data else None
    if target_cache:
        train_dataset = TargetCacheDataset(train_dataset, target_cache)
    if eval_dataset is None and eval_fraction:
        if target_cache:
            train_dataset, eval_dataset = train_dataset.split(eval_fraction, seed=seed)
        else:
            split = train_dataset.train_test_split(test_size=eval_fraction, seed=seed)
            train_dataset, eval_dataset = split["train"], split["test"]
    return train_dataset, eval_dataset


# Draft families: (model class, trainer class, training-arguments class).
DRAFT_TYPES: dict[str, tuple[type, type[DraftTrainer], type]] = {
    "dspark": (DSparkDraftModel, DSparkTrainer, DSparkTrainingArguments),
    "eagle3": (Eagle3DraftModel, Eagle3Trainer, Eagle3TrainingArguments),
}
# EAGLE-3 fuses a low, a middle and a high target layer.
EAGLE3_NUM_TARGET_FEATURES = 3


def _check_draft_type(draft_type: str) -> str:
    if draft_type not in DRAFT_TYPES:
        raise ValueError(f"draft_type must be one of {sorted(DRAFT_TYPES)}, got {draft_type!r}.")
    return draft_type


def draft_type_of(draft: str | os.PathLike | PreTrainedModel) -> str:
    """`"dspark"` or `"eagle3"`: the family of a draft model (inside any PEFT / DDP wrapper) or of a saved draft
    (our layout: its `model_type`; the reference's EAGLE-3 layout and EAGLE / SpecForge's are recognised too;
    anything else is DSpark)."""
    if isinstance(draft, torch.nn.Module):
        return "eagle3" if isinstance(unwrap_draft(draft), Eagle3DraftModel) else "dspark"
    config = read_reference_config(draft) or {}
    if (
        config.get("model_type") == Eagle3DraftConfig.model_type
        or is_eagle3_deepspec_checkpoint(draft)
        or is_eagle_checkpoint(draft)
    ):
        return "eagle3"
    return "dspark"


def build_training_draft(
    target: PreTrainedModel,
    tokenizer=None,
    draft: str | os.PathLike | PreTrainedModel | None = None,
    *,
    draft_type: str | None = None,
    num_draft_layers: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    seed: int = 42,
) -> DSparkDraftModel | Eagle3DraftModel:
    """The draft to train against `target`.

    - `draft=None`: a fresh draft of `draft_type` (`"dspark"`, the default, or `"eagle3"`), initialised after
      `torch.manual_seed(seed)`, with `num_draft_layers` decoder layers and any other config fields in
      `config_overrides` (which win over `num_draft_layers`): [`DSparkDraftModel.from_target`], or
      [`Eagle3DraftModel.from_target`] with `target_layer_ids` defaulting to a low, a middle and a high layer (3
      spread over the target's depth, as EAGLE-3 chooses them).
    - `draft` a saved draft (folder, either layout) or a model attached to `target`: training continues from its
      weights and configuration (its family is read from it; a `draft_type` that differs is refused); for a DSpark
      draft, a `num_draft_layers` above its depth appends identity-initialised layers
      ([`DSparkDraftModel.add_layers`]).
    """
    if draft is None:
        draft_type = _check_draft_type(draft_type or "dspark")
        overrides = {} if num_draft_layers is None else {"num_hidden_layers": num_draft_layers}
        overrides.update(config_overrides or {})
        torch.manual_seed(seed)
        if draft_type == "dspark":
            return DSparkDraftModel.from_target(target, tokenizer=tokenizer, **overrides)
        if "target_layer_ids" not in overrides:
            depth = target.config.get_text_config().num_hidden_layers
            overrides["target_layer_ids"] = default_target_layer_ids(depth, EAGLE3_NUM_TARGET_FEATURES)
        return Eagle3DraftModel.from_target(target, **overrides)
    if config_overrides:
        raise ValueError(
            f"config_overrides {sorted(config_overrides)} only configure a fresh draft (draft=None); a saved draft "
            "keeps its configuration. Leave them out, or train a fresh draft."
        )
    saved_type = draft_type_of(draft)
    if draft_type is not None and _check_draft_type(draft_type) != saved_type:
        name = type(unwrap_draft(draft)).__name__ if isinstance(draft, torch.nn.Module) else str(draft)
        raise ValueError(
            f"draft_type={draft_type!r} but the draft to continue ({name}) is a {saved_type} draft. Leave "
            "draft_type out to continue it, or train a fresh draft."
        )
    model_class = DRAFT_TYPES[saved_type][0]
    if not isinstance(draft, torch.nn.Module):
        draft = model_class.from_pretrained(draft, target_model=target)
    current = draft.config.num_hidden_layers
    if num_draft_layers is None or num_draft_layers == current:
        return draft
    if saved_type != "dspark":
        raise ValueError(
            f"num_draft_layers={num_draft_layers} differs from the {current} layers of the saved EAGLE-3 draft, and "
            "EAGLE-3 drafts cannot be deepened. Leave it out to keep the draft's depth, or train a fresh draft."
        )
    if num_draft_layers < current:
        raise ValueError(
            f"num_draft_layers={num_draft_layers} is below the {current} layers of the saved draft; layers can only "
            "be added. Leave it out to keep the draft's depth, or train a fresh draft."
        )
    draft.add_layers(num_draft_layers - current)
    logger.warning(
        "Added %d identity-initialised layer(s) to the draft (%d now).", num_draft_layers - current, num_draft_layers
    )
    return draft


def _token_dataset(dataset):
    """The tokenized examples of a dataset or of a [`TargetCacheDataset`]."""
    return dataset.dataset.select(dataset.indices) if isinstance(dataset, TargetCacheDataset) else dataset


VOCABULARY_NOTE = "Draft vocabulary:"  # how the model-card note on the draft vocabulary starts


def apply_draft_vocabulary(
    draft: DSparkDraftModel | Eagle3DraftModel,
    dataset,
    size: int,
    source: str = "the training data",
    held_out=None,
    held_out_source: str = "held-out conversations",
) -> tuple[list[int], float]:
    """Restricts `draft`'s drafting to the `size` most frequent answer tokens of a tokenized `dataset` (the
    end-of-turn ids always included, see [`frequent_token_ids`]) and notes their coverage, naming `source`, in its
    model card (drafts that have one), with the coverage of the answers of `held_out` (conversations the vocabulary
    was not built from, e.g. the eval split: the honest figure) when given. A [`TargetCacheDataset`] counts the token
    ids of its own examples. Returns `(token_ids, coverage)` (in sample).
    """
    eos = draft.config.eos_token_id
    always = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    token_ids, coverage = frequent_token_ids(_token_dataset(dataset), size, always_include=always)
    draft.set_draft_vocabulary(token_ids)
    note = f"{VOCABULARY_NOTE} {len(token_ids)} tokens, covering {coverage:.2%} of the answer tokens of {source}"
    if held_out is not None:
        outside = vocabulary_coverage(_token_dataset(held_out), token_ids)
        note += f" and {outside:.2%} of those of {held_out_source}, which it was not built from"
        logger.warning("Draft vocabulary covers %.2f%% of the answers of %s.", 100 * outside, held_out_source)
    note += "."
    card_data = getattr(draft, "model_card_data", None)
    if card_data is not None:  # the note of an earlier vocabulary no longer holds: replaced, not kept beside it
        kept = [p for p in (card_data.notes or "").split("\n\n") if p and not p.startswith(VOCABULARY_NOTE)]
        card_data.notes = "\n\n".join([*kept, note])
    return token_ids, coverage


def cache_target_features(
    target: PreTrainedModel,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    target_layer_ids: list[int] | None = None,
    draft: str | os.PathLike | DSparkDraftModel | Eagle3DraftModel | None = None,
    draft_type: str = "dspark",
    max_length: int = 2048,
    batch_size: int = 8,
    shard_size: int = 64,
    dtype: str | torch.dtype = "bfloat16",
    progress: bool = True,
) -> Path:
    """Runs `target` once over tokenized `data` (as for [`load_training_datasets`], same `max_length`) and stores
    the features a draft reads ([`build_target_cache`]; resumable) for `load_training_datasets(target_cache=...)`.

    The layers are `target_layer_ids`, else those of `draft` (a saved draft or a model, either family), else the
    default of a fresh `draft_type` draft for the target's depth (what [`build_training_draft`] gives it). Returns the cache folder ([`load_target_cache_info`] describes it).
    """
    if target_layer_ids is None and isinstance(draft, (DSparkDraftModel, Eagle3DraftModel)):
        target_layer_ids = draft.config.target_layer_ids
    elif target_layer_ids is None and draft is not None and draft_type_of(draft) == "eagle3":
        target_layer_ids = read_reference_config(draft)["target_layer_ids"]
    elif target_layer_ids is None and draft is not None:
        target_layer_ids = DSparkDraftConfig.from_pretrained(draft).target_layer_ids
    elif target_layer_ids is None:
        depth = target.config.get_text_config().num_hidden_layers
        count = EAGLE3_NUM_TARGET_FEATURES if _check_draft_type(draft_type) == "eagle3" else None
        target_layer_ids = default_target_layer_ids(depth, count) if count else default_target_layer_ids(depth)
    dataset = load_training_dataset(data, tokenizer, max_length=max_length)
    return build_target_cache(
        target,
        dataset,
        list(target_layer_ids),
        output_dir,
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype,
        progress=progress,
    )


CHECKPOINT_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that holds weights and `trainer_state.json` (written last by
    the `Trainer`), or None when there is none. Newer folders a killed run left half-written are skipped with a
    warning."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (folder / "trainer_state.json").is_file() and any((folder / w).is_file() for w in CHECKPOINT_WEIGHTS):
            return str(folder)
        logger.warning("Skipping %s: it is incomplete (a run stopped while saving it).", folder)
    logger.warning("No complete checkpoint in %s to resume from; training starts from the beginning.", output_dir)
    return None


@dataclass
class DraftTrainingResult:
    """What [`train`] returns: the trainer (its model is the trained draft, PEFT-wrapped when an adapter was
    trained) and the train metrics, with the eval metrics when there was an eval dataset."""

    trainer: DraftTrainer
    metrics: dict[str, float]

    @property
    def draft(self) -> DSparkDraftModel | Eagle3DraftModel:
        """The trained draft (the base model of a PEFT adapter)."""
        return unwrap_draft(self.trainer.model)


def train(
    target: PreTrainedModel,
    train_dataset,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    eval_dataset=None,
    draft: str | os.PathLike | DSparkDraftModel | Eagle3DraftModel | None = None,
    draft_type: str | None = None,
    num_draft_layers: int | None = None,
    draft_config: Mapping[str, Any] | None = None,
    draft_vocab_size: int | None = None,
    vocabulary_source: str = "the training data",
    draft_dtype: str | torch.dtype = "float32",
    peft_config=None,
    training_args: Mapping[str, Any] | None = None,
    resume_from_checkpoint: str | os.PathLike | bool | None = None,
    seed: int = 42,
) -> DraftTrainingResult:
    """Trains a draft (DSpark or EAGLE-3) against the frozen `target` with its family's trainer ([`DSparkTrainer`]
    or [`Eagle3Trainer`]) and saves it, its metrics and the trainer state to `output_dir` (checkpoints go there too).

    Args:
        train_dataset, eval_dataset: tokenized examples (or [`TargetCacheDataset`]s), e.g. from
            [`load_training_datasets`]; with an eval dataset the final draft is also evaluated.
        draft, draft_type, num_draft_layers, draft_config: the draft, built by [`build_training_draft`] (a fresh
            one of `draft_type`, `"dspark"` by default or `"eagle3"`, with `draft_config` overrides, or a saved one
            continued, a DSpark one deepened to `num_draft_layers`).
        draft_vocab_size: train (and later draft) over the `draft_vocab_size` most frequent answer tokens of
            `train_dataset` only ([`apply_draft_vocabulary`], noting `vocabulary_source` in the model card).
        draft_dtype: dtype of the trainable draft weights ("auto": keep them as built); they stay float32 by
            default when the target runs in bf16: set `bf16=True` in `training_args` for mixed-precision compute.
        peft_config: a `peft` config (e.g. `LoraConfig`): train an adapter on the draft instead of the draft.
        training_args: fields of the family's arguments ([`DSparkTrainingArguments`], or [`DraftTrainingArguments`]
            for EAGLE-3, which has no `num_anchors`); `output_dir` and `seed` are filled in, and with an eval
            dataset `eval_strategy` defaults to "steps" when `eval_steps` is given, else "epoch".
        resume_from_checkpoint: a checkpoint folder, or True / "latest" for the newest complete checkpoint in
            `output_dir` ([`latest_complete_checkpoint`]; none: from the beginning).
    """
    draft = build_training_draft(
        target,
        tokenizer,
        draft,
        draft_type=draft_type,
        num_draft_layers=num_draft_layers,
        config_overrides=draft_config,
        seed=seed,
    )
    _, trainer_class, args_class = DRAFT_TYPES[draft_type_of(draft)]
    if isinstance(train_dataset, TargetCacheDataset):
        train_dataset.check_target_layer_ids(draft.config.target_layer_ids)
    if draft_vocab_size is not None:
        _, coverage = apply_draft_vocabulary(
            draft, train_dataset, draft_vocab_size, vocabulary_source, held_out=eval_dataset,
            held_out_source="the eval split",
        )
        logger.warning("Draft vocabulary of %d tokens covers %.2f%% of the answers.", draft_vocab_size, 100 * coverage)
    dtype = parse_dtype(draft_dtype) if isinstance(draft_dtype, str) else draft_dtype
    if dtype != "auto":
        draft.to(dtype)
    model = draft
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(draft, peft_config)

    settings = dict(training_args or {})
    if eval_dataset is not None and settings.get("eval_strategy") is None:
        settings["eval_strategy"] = "steps" if "eval_steps" in settings else "epoch"
    if "num_anchors" in settings and args_class is not DSparkTrainingArguments:
        raise ValueError(
            "num_anchors is a DSpark training option (blocks per sequence); an EAGLE-3 draft trains on every position "
            "of every sequence. Leave it out of training_args."
        )
    trainer = trainer_class(
        model=model,
        args=args_class(output_dir=str(output_dir), seed=seed, **settings),
        target_model=target,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    if resume_from_checkpoint in ("latest", True):
        resume_from_checkpoint = latest_complete_checkpoint(output_dir)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    trainer.save_metrics("train", output.metrics)
    trainer.save_state()
    metrics = dict(output.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return DraftTrainingResult(trainer, metrics)
