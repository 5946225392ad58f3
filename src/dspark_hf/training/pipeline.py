"""From a target and tokenized data to a trained draft in one call: the pipeline behind `dspark-hf train`,
`cache-features` and `draft-vocab`.

[`train`] builds (or continues) a draft with [`build_training_draft`], optionally restricts it to a draft vocabulary
([`apply_draft_vocabulary`]), wraps it in a PEFT adapter, trains it with [`DSparkTrainer`] and saves it;
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

from ..models.dspark import DSparkDraftConfig, DSparkDraftModel
from ..targets import default_target_layer_ids, parse_dtype
from .data import frequent_token_ids, load_training_dataset
from .target_cache import TargetCacheDataset, build_target_cache
from .trainer import DSparkTrainer, DSparkTrainingArguments, unwrap_draft

logger = logging.get_logger(__name__)

__all__ = [
    "DraftTrainingResult",
    "apply_draft_vocabulary",
    "build_training_draft",
    "cache_target_features",
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


def build_training_draft(
    target: PreTrainedModel,
    tokenizer=None,
    draft: str | os.PathLike | DSparkDraftModel | None = None,
    *,
    num_draft_layers: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    seed: int = 42,
) -> DSparkDraftModel:
    """The draft to train against `target`.

    - `draft=None`: a fresh draft ([`DSparkDraftModel.from_target`], initialised after `torch.manual_seed(seed)`)
      with `num_draft_layers` decoder layers and any other [`DSparkDraftConfig`] fields in `config_overrides`
      (which win over `num_draft_layers`).
    - `draft` a saved draft (folder, either layout) or a model attached to `target`: training continues from its
      weights and configuration; a `num_draft_layers` above its depth appends identity-initialised layers
      ([`DSparkDraftModel.add_layers`]).
    """
    if draft is None:
        overrides = {} if num_draft_layers is None else {"num_hidden_layers": num_draft_layers}
        overrides.update(config_overrides or {})
        torch.manual_seed(seed)
        return DSparkDraftModel.from_target(target, tokenizer=tokenizer, **overrides)
    if config_overrides:
        raise ValueError(
            f"config_overrides {sorted(config_overrides)} only configure a fresh draft (draft=None); a saved draft "
            "keeps its configuration. Leave them out, or train a fresh draft."
        )
    if not isinstance(draft, DSparkDraftModel):
        draft = DSparkDraftModel.from_pretrained(draft, target_model=target)
    current = draft.config.num_hidden_layers
    if num_draft_layers is None or num_draft_layers == current:
        return draft
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


def apply_draft_vocabulary(
    draft: DSparkDraftModel, dataset, size: int, source: str = "the training data"
) -> tuple[list[int], float]:
    """Restricts `draft`'s drafting to the `size` most frequent answer tokens of a tokenized `dataset` (the
    end-of-turn ids always included, see [`frequent_token_ids`]) and notes their coverage, naming `source`, in its
    model card. A [`TargetCacheDataset`] counts the token ids of its own examples. Returns `(token_ids, coverage)`.
    """
    if isinstance(dataset, TargetCacheDataset):
        dataset = dataset.dataset.select(dataset.indices)
    eos = draft.config.eos_token_id
    always = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    token_ids, coverage = frequent_token_ids(dataset, size, always_include=always)
    draft.set_draft_vocabulary(token_ids)
    note = f"Draft vocabulary: {len(token_ids)} tokens, covering {coverage:.2%} of the answer tokens of {source}."
    draft.model_card_data.notes = "\n\n".join(filter(None, [draft.model_card_data.notes, note]))
    return token_ids, coverage


def cache_target_features(
    target: PreTrainedModel,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    target_layer_ids: list[int] | None = None,
    draft: str | os.PathLike | DSparkDraftModel | None = None,
    max_length: int = 2048,
    batch_size: int = 8,
    shard_size: int = 64,
    dtype: str | torch.dtype = "bfloat16",
    progress: bool = True,
) -> Path:
    """Runs `target` once over tokenized `data` (as for [`load_training_datasets`], same `max_length`) and stores
    the features a draft reads ([`build_target_cache`]; resumable) for `load_training_datasets(target_cache=...)`.

    The layers are `target_layer_ids`, else those of `draft` (a saved draft or a model), else the default for the
    target's depth. Returns the cache folder ([`load_target_cache_info`] describes it).
    """
    if target_layer_ids is None and isinstance(draft, DSparkDraftModel):
        target_layer_ids = draft.config.target_layer_ids
    elif target_layer_ids is None and draft is not None:
        target_layer_ids = DSparkDraftConfig.from_pretrained(draft).target_layer_ids
    elif target_layer_ids is None:
        target_layer_ids = default_target_layer_ids(target.config.get_text_config().num_hidden_layers)
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

    trainer: DSparkTrainer
    metrics: dict[str, float]

    @property
    def draft(self) -> DSparkDraftModel:
        """The trained draft (the base model of a PEFT adapter)."""
        return unwrap_draft(self.trainer.model)


def train(
    target: PreTrainedModel,
    train_dataset,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    eval_dataset=None,
    draft: str | os.PathLike | DSparkDraftModel | None = None,
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
    """Trains a DSpark draft against the frozen `target` and saves it, its metrics and the trainer state to
    `output_dir` (checkpoints go there too).

    Args:
        train_dataset, eval_dataset: tokenized examples (or [`TargetCacheDataset`]s), e.g. from
            [`load_training_datasets`]; with an eval dataset the final draft is also evaluated.
        draft, num_draft_layers, draft_config: the draft, built by [`build_training_draft`] (a fresh one with
            `draft_config` overrides, or a saved one continued, deepened to `num_draft_layers`).
        draft_vocab_size: train (and later draft) over the `draft_vocab_size` most frequent answer tokens of
            `train_dataset` only ([`apply_draft_vocabulary`], noting `vocabulary_source` in the model card).
        draft_dtype: dtype of the trainable draft weights ("auto": keep them as built); they stay float32 by
            default when the target runs in bf16: set `bf16=True` in `training_args` for mixed-precision compute.
        peft_config: a `peft` config (e.g. `LoraConfig`): train an adapter on the draft instead of the draft.
        training_args: [`DSparkTrainingArguments`] fields; `output_dir` and `seed` are filled in, and with an eval
            dataset `eval_strategy` defaults to "steps" when `eval_steps` is given, else "epoch".
        resume_from_checkpoint: a checkpoint folder, or True / "latest" for the newest complete checkpoint in
            `output_dir` ([`latest_complete_checkpoint`]; none: from the beginning).
    """
    draft = build_training_draft(
        target, tokenizer, draft, num_draft_layers=num_draft_layers, config_overrides=draft_config, seed=seed
    )
    if isinstance(train_dataset, TargetCacheDataset):
        train_dataset.check_target_layer_ids(draft.config.target_layer_ids)
    if draft_vocab_size is not None:
        _, coverage = apply_draft_vocabulary(draft, train_dataset, draft_vocab_size, vocabulary_source)
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
    trainer = DSparkTrainer(
        model=model,
        args=DSparkTrainingArguments(output_dir=str(output_dir), seed=seed, **settings),
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
