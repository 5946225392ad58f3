"""`DraftTrainer`: the `transformers.Trainer` machinery every draft family trains with.

A draft is trained against a frozen target: the target runs once per batch under `no_grad` (or its features come
from a target cache), the draft is `Trainer.model` (optionally wrapped in a `peft.PeftModel`), so checkpoints,
resuming, DDP through `accelerate launch`, mixed precision and PEFT adapters work as for any transformers model. The
target is a trainer attribute moved to the accelerator device: it gets no optimizer state and is never saved.

The families differ only by their loss step: [`DSparkTrainer`] (anchored blocks, `dspark_loss`) and
[`Eagle3Trainer`] (training-time test over whole sequences, `eagle3_loss`) subclass [`DraftTrainer`] and implement
[`DraftTrainer.draft_loss`] and [`DraftTrainer.new_metrics`].
"""

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from ..models.dspark.modeling_dspark import DSparkDraftModel, select_target_features
from ..models.eagle3.modeling_eagle3 import Eagle3DraftModel
from .collator import DSparkDataCollator

logger = logging.get_logger(__name__)

__all__ = ["DRAFT_CLASSES", "DraftTrainer", "DraftTrainingArguments", "run_target", "unwrap_draft"]

# The draft families the trainers train.
DRAFT_CLASSES: tuple[type[PreTrainedModel], ...] = (DSparkDraftModel, Eagle3DraftModel)


@dataclass
class DraftTrainingArguments(TrainingArguments):
    """[`TrainingArguments`] with the defaults every draft trainer needs (the EAGLE-3 trainer's arguments; DSpark
    adds `num_anchors` in [`DSparkTrainingArguments`]). The loss settings come from the draft's config.

    Args:
        remove_unused_columns: defaults to `False` (the draft's forward does not take dataset columns).
        ddp_find_unused_parameters: defaults to `False`: every trainable draft parameter is used in the draft's
            training forward.
    """

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns (the draft trainers consume them themselves)."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "`find_unused_parameters` of DistributedDataParallel."}
    )


def unwrap_draft(model: nn.Module, draft_class: type | tuple[type, ...] = DRAFT_CLASSES) -> PreTrainedModel:
    """The draft (a [`DSparkDraftModel`] or an [`Eagle3DraftModel`], or only `draft_class`) inside DDP / accelerate /
    torch.compile / PEFT wrappers."""
    seen = 0
    while not isinstance(model, draft_class) and seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module"):  # DistributedDataParallel, DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            break
    if not isinstance(model, draft_class):
        classes = draft_class if isinstance(draft_class, tuple) else (draft_class,)
        expected = " or ".join(c.__name__ for c in classes)
        raise TypeError(f"Expected a {expected} (possibly wrapped by PEFT/DDP), got {type(model).__name__}.")
    return model


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def run_target(
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    layer_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One frozen target pass → context features `(batch, S, m·d)` (decoder layers `layer_ids`, concatenated) and
    final-norm hidden states `(batch, S, d)` (the LM head's input, from which a draft recomputes target logits).

    The target's own LM head is skipped where its forward supports `logits_to_keep`.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "output_hidden_states": True, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if _accepts(target, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    hidden_states = target(**kwargs).hidden_states
    return select_target_features(hidden_states, layer_ids), hidden_states[-1]


def target_inputs(
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    layer_ids: list[int],
    target_features: torch.Tensor | None,
    target_final_hidden: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(features, final_hidden)` of a batch: the cached ones when given (both), else from [`run_target`]."""
    if (target_features is None) != (target_final_hidden is None):
        raise ValueError("Pass both target_features and target_final_hidden (a target cache), or neither.")
    if target_features is None:
        return run_target(target, input_ids, attention_mask, layer_ids)
    return target_features, target_final_hidden


class DraftTrainer(Trainer):
    """A [`Trainer`] for drafts of the family `draft_class`; subclasses implement the loss step.

    Args:
        model: a draft of `draft_class` (e.g. `draft_class.from_target(target)`), or a `peft.PeftModel` around one.
            It is attached to `target_model` if it is not already.
        target_model: the frozen target causal LM. It is frozen here (`requires_grad_(False)`, `eval()`), kept as
            `trainer.target_model` on the accelerator device, never optimised and never saved.
        args: preferably the family's arguments class (`default_args_class`); plain `TrainingArguments` work too.
        data_collator: defaults to [`DSparkDataCollator`] padding with the tokenizer's (or draft config's) pad id.
        Everything else as for [`Trainer`]. Datasets hold `input_ids` and `loss_mask` (see
        `dspark_hf.training.tokenize_conversations`); no labels are needed. A [`TargetCacheDataset`] adds cached
        target features, and the target then only lends its LM head (no target forward per batch).

    Subclasses set `draft_class` and `default_args_class` and implement [`draft_loss`] (one batch → a loss output
    with `.loss` and `.statistics()`, and the draft's output) and [`new_metrics`] (an accumulator of statistics).
    """

    draft_class: type[PreTrainedModel] = PreTrainedModel
    default_args_class: type[TrainingArguments] = DraftTrainingArguments

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        target_model: PreTrainedModel | None = None,
        **kwargs,
    ):
        name, draft_name = type(self).__name__, self.draft_class.__name__
        if target_model is None:
            raise ValueError(f"{name} needs the frozen target: {name}(model=draft, target_model=target).")
        if model is None:
            raise ValueError(f"{name} needs a draft: model={draft_name}.from_target(target) (or a PeftModel).")
        draft = unwrap_draft(model)
        if not isinstance(draft, self.draft_class):
            raise TypeError(
                f"{name} trains {draft_name} drafts, got a {type(draft).__name__}; use the trainer of its family "
                "(DSparkTrainer for DSparkDraftModel, Eagle3Trainer for Eagle3DraftModel)."
            )
        if args is None:
            args = self.default_args_class(output_dir=f"{draft.config.model_type}_trainer_output")
        elif getattr(args, "remove_unused_columns", False):
            logger.warning(f"{name}: setting remove_unused_columns=False (the loss needs `loss_mask`).")
            args.remove_unused_columns = False
        target_model.requires_grad_(False)
        target_model.eval()
        if not draft.is_attached_to(target_model):
            draft.attach(target_model)
        if data_collator is None:
            tokenizer = processing_class if hasattr(processing_class, "pad_token_id") else None
            pad = None if tokenizer is not None else draft.config.pad_token_id
            data_collator = DSparkDataCollator(tokenizer=tokenizer, pad_token_id=pad)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if getattr(target_model, "hf_device_map", None) is None:
            target_model.to(self.accelerator.device)
        self.target_model = target_model
        self.model_accepts_loss_kwargs = False
        self._train_metrics = self.new_metrics()
        self._eval_metrics = self.new_metrics()

    # -- what a family defines -------------------------------------------------------------------------------------

    def new_metrics(self):
        """An empty accumulator with `add(statistics)`, `compute() -> dict`, `reset()` and truthiness."""
        raise NotImplementedError(f"{type(self).__name__} must implement new_metrics().")

    def draft_loss(self, model: nn.Module, inputs: dict[str, Any], training: bool) -> tuple[Any, Any]:
        """The loss of one collated batch (`input_ids`, `attention_mask`, `loss_mask`, optionally `target_features`
        and `target_final_hidden`) → `(loss_output, draft_output)`; `loss_output.loss` is what is optimised."""
        raise NotImplementedError(f"{type(self).__name__} must implement draft_loss().")

    def record_metrics(self, result: Any, training: bool) -> None:
        """Adds `result.statistics()` (summed over processes) to the train or eval accumulator."""
        statistics = result.statistics()
        if self.accelerator.num_processes > 1:
            statistics = self.accelerator.reduce(statistics, reduction="sum")
        accumulator = self._train_metrics if training else self._eval_metrics
        accumulator.add(statistics)

    def start_evaluation(self) -> None:
        """Called before every evaluation loop: clears the eval metrics."""
        self._eval_metrics.reset()

    # -- helpers ---------------------------------------------------------------------------------------------------

    @property
    def draft(self) -> PreTrainedModel:
        """The bare draft (inside any PEFT / DDP wrapper)."""
        return unwrap_draft(self.model, self.draft_class)

    @staticmethod
    def batch_masks(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(loss_mask, attention_mask)` of a batch; without a `loss_mask` every real token is supervised."""
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        loss_mask = inputs.get("loss_mask")
        if loss_mask is None:
            loss_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return loss_mask, attention_mask

    # -- Trainer overrides -----------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """[`Trainer.train`]; then records the steps and seed in the draft's model card data (when it has one)."""
        output = super().train(*args, **kwargs)
        card_data = getattr(self.draft, "model_card_data", None)
        if card_data is not None:
            card_data.training_steps, card_data.seed = self.state.global_step, self.args.seed
        return output

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        training = model.training
        result, output = self.draft_loss(model, inputs, training)
        self.record_metrics(result, training)
        return (result.loss, output) if return_outputs else result.loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self.start_evaluation()
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=True,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        for name, value in self._eval_metrics.compute().items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        self._eval_metrics.reset()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_metrics:
            logs.update(self._train_metrics.compute())
            self._train_metrics.reset()
        super().log(logs, start_time)
