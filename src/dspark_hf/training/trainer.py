"""`DSparkTrainer`: trains a DSpark draft against a frozen target with `transformers.Trainer`.

Per batch (paper §3.3): the frozen target runs once (no grad) with `output_hidden_states=True`; anchors are sampled
where the next token is an assistant token; every block of the batch goes through the draft in ONE forward with
[`block_attention_mask`] (each block sees target features strictly before its anchor, exactly as at inference);
the target's LM head is applied only at the block positions; the loss is [`dspark_loss`].

The draft is `Trainer.model` (optionally wrapped in a `peft.PeftModel`), so checkpoints, resuming, DDP through
`accelerate launch`, mixed precision and PEFT adapters work as for any transformers model. The target is a
trainer attribute moved to the accelerator device: it gets no optimizer state and is never saved.
"""

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from ..models.dspark.modeling_dspark import DSparkDraftModel, DSparkDraftOutput, select_target_features
from .blocks import DSparkBlockBatch, block_attention_mask, build_blocks, sample_anchor_positions
from .collator import DSparkDataCollator
from .losses import DSparkLossOutput, DSparkMetricAccumulator, dspark_loss

logger = logging.get_logger(__name__)

__all__ = [
    "DSparkTrainer",
    "DSparkTrainingArguments",
    "compute_dspark_loss",
    "run_target",
    "unwrap_draft",
]


@dataclass
class DSparkTrainingArguments(TrainingArguments):
    """[`TrainingArguments`] with DSpark defaults and options.

    Args:
        num_anchors (`int`, defaults to 16): blocks sampled per training sequence (fewer when the sequence has
            fewer assistant positions). Loss weights, γ and the position decay come from the draft's config.
        remove_unused_columns: defaults to `False` (the draft's forward does not take dataset columns).
        ddp_find_unused_parameters: defaults to `False`: every trainable draft parameter is used in the draft's
            training forward.
    """

    num_anchors: int = field(default=16, metadata={"help": "Blocks (anchors) sampled per training sequence."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns (the DSpark trainer consumes them itself)."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "`find_unused_parameters` of DistributedDataParallel."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {self.num_anchors}.")


def unwrap_draft(model: nn.Module) -> DSparkDraftModel:
    """The [`DSparkDraftModel`] inside DDP / accelerate / torch.compile / PEFT wrappers."""
    seen = 0
    while not isinstance(model, DSparkDraftModel) and seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module"):  # DistributedDataParallel, DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            break
    if not isinstance(model, DSparkDraftModel):
        raise TypeError(
            f"Expected a DSparkDraftModel (possibly wrapped by PEFT/DDP), got {type(model).__name__}."
        )
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
    """One frozen target pass → context features `(batch, S, m·d)` and final-norm hidden states `(batch, S, d)`.

    The target's own LM head is skipped where its forward supports `logits_to_keep`.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "output_hidden_states": True, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if _accepts(target, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    hidden_states = target(**kwargs).hidden_states
    return select_target_features(hidden_states, layer_ids), hidden_states[-1]


def compute_dspark_loss(
    model: nn.Module,
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_anchors: int = 16,
    generator: torch.Generator | None = None,
    target_features: torch.Tensor | None = None,
    target_final_hidden: torch.Tensor | None = None,
) -> tuple[DSparkLossOutput, DSparkDraftOutput, DSparkBlockBatch]:
    """The DSpark loss of one batch of sequences (what [`DSparkTrainer.compute_loss`] runs).

    `model` is the draft, or a wrapper around it (DDP, PEFT); its forward runs once, over every block of the batch,
    heads included (`prev_ids=`).
    With `target_features` `(batch, S, m·d)` and `target_final_hidden` `(batch, S, d)` from a target cache (see
    [`TargetCacheDataset`]) the target's forward is skipped; its LM head is still used at the block positions.
    A draft with a draft vocabulary (`draft.set_draft_vocabulary`, e.g. `dspark-hf train --draft-vocab-size`)
    computes draft and target logits over its tokens only: TV and the confidence target compare the two softmaxes
    over that set, and CE skips labels outside it. This is what the draft samples from at inference, and it makes
    the LM-head work, most of a small draft's step, `vocab_size / draft_vocab_size` times smaller.
    """
    draft = unwrap_draft(model)
    config = draft.config
    block_size = config.block_size
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, length = input_ids.shape
    with torch.no_grad():
        if (target_features is None) != (target_final_hidden is None):
            raise ValueError("Pass both target_features and target_final_hidden (a target cache), or neither.")
        if target_features is None:
            features, final_hidden = run_target(target, input_ids, attention_mask, config.target_layer_ids)
        else:
            features, final_hidden = target_features, target_final_hidden
        anchors, anchor_valid = sample_anchor_positions(
            loss_mask, num_anchors, block_size, generator=generator, attention_mask=attention_mask
        )
        blocks = build_blocks(
            input_ids, loss_mask, anchors, anchor_valid, block_size, config.mask_token_id, attention_mask
        )
        gather_index = blocks.target_positions.flatten(1).unsqueeze(-1).expand(-1, -1, final_hidden.shape[-1])
        target_hidden = final_hidden.gather(1, gather_index).view(*blocks.target_positions.shape, -1)
        target_logits = draft.compute_logits(target_hidden, draft_vocabulary=True)
        labels, label_in_vocabulary = draft.draft_vocabulary_index(blocks.labels)
        mask = block_attention_mask(anchors, block_size, length, context_mask=attention_mask)
        context_position_ids = torch.arange(length, device=input_ids.device).expand(batch, -1)
    output = model(
        input_ids=blocks.input_ids,
        position_ids=blocks.position_ids,
        target_hidden_states=features,
        context_position_ids=context_position_ids,
        attention_mask=mask,
        prev_ids=blocks.prev_ids,
    )
    loss = dspark_loss(
        output.logits,
        target_logits,
        labels,
        blocks.valid,
        output.confidence_logits,
        ce_valid=blocks.valid & label_in_vocabulary,
        ce_weight=config.ce_loss_weight,
        tv_weight=config.tv_loss_weight,
        confidence_weight=config.confidence_loss_weight,
        position_decay=config.loss_position_decay,
    )
    return loss, output, blocks


class DSparkTrainer(Trainer):
    """A [`Trainer`] for DSpark drafts.

    Args:
        model: a [`DSparkDraftModel`] (e.g. `DSparkDraftModel.from_target(target)`), or a `peft.PeftModel` around
            one. It is attached to `target_model` if it is not already.
        target_model: the frozen target causal LM. It is frozen here (`requires_grad_(False)`, `eval()`), kept as
            `trainer.target_model` on the accelerator device, never optimised and never saved.
        args: preferably [`DSparkTrainingArguments`]; plain `TrainingArguments` work too (`num_anchors=16`).
        data_collator: defaults to [`DSparkDataCollator`] padding with the tokenizer's (or draft config's) pad id.
        Everything else as for [`Trainer`]. Datasets hold `input_ids` and `loss_mask` (see
        `dspark_hf.training.tokenize_conversations`); no labels are needed. A [`TargetCacheDataset`] adds cached
        target features, and the target then only lends its LM head (no target forward per batch).

    Logged alongside `loss`: `ce`, `tv`, `confidence_error`, `acceptance_k` (k = 1..γ), `expected_tau`, and the
    weighted terms `ce_loss`, `tv_loss`, `confidence_loss`; `evaluate()` reports them with the `eval_` prefix.
    """

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
        if target_model is None:
            raise ValueError(
                "DSparkTrainer needs the frozen target: DSparkTrainer(model=draft, target_model=target)."
            )
        if model is None:
            raise ValueError(
                "DSparkTrainer needs a draft: model=DSparkDraftModel.from_target(target) (or a PeftModel)."
            )
        if args is None:
            args = DSparkTrainingArguments(output_dir="dspark_trainer_output")
        elif getattr(args, "remove_unused_columns", False):
            logger.warning("DSparkTrainer: setting remove_unused_columns=False (the loss needs `loss_mask`).")
            args.remove_unused_columns = False
        draft = unwrap_draft(model)
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
        block_size = draft.config.block_size
        self._train_metrics = DSparkMetricAccumulator(block_size)
        self._eval_metrics = DSparkMetricAccumulator(block_size)
        self._anchor_step = -1
        self._anchor_micro_step = 0
        self._eval_batch_index = 0

    # -- helpers ---------------------------------------------------------------------------------------------------

    @property
    def draft(self) -> DSparkDraftModel:
        """The bare draft (inside any PEFT / DDP wrapper)."""
        return unwrap_draft(self.model)

    @property
    def num_anchors(self) -> int:
        return int(getattr(self.args, "num_anchors", 16))

    def _anchor_generator(self, training: bool) -> torch.Generator:
        """A CPU generator seeded by (seed, global step, micro-step, process): resuming redraws the same anchors."""
        if training:
            step = self.state.global_step
            if step != self._anchor_step:
                self._anchor_step, self._anchor_micro_step = step, 0
            key = ("train", self.args.seed, step, self._anchor_micro_step, self.args.process_index)
            self._anchor_micro_step += 1
        else:
            key = ("eval", self.args.seed, self._eval_batch_index, self.args.process_index)
            self._eval_batch_index += 1
        seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)
        generator = torch.Generator()
        generator.manual_seed(seed)
        return generator

    def _record(self, result: DSparkLossOutput, training: bool) -> None:
        statistics = result.statistics()
        if self.accelerator.num_processes > 1:
            statistics = self.accelerator.reduce(statistics, reduction="sum")
        accumulator = self._train_metrics if training else self._eval_metrics
        accumulator.add(statistics, has_confidence=result.has_confidence)

    # -- Trainer overrides -----------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """[`Trainer.train`]; then records the steps and seed in the draft's model card data."""
        output = super().train(*args, **kwargs)
        card_data = self.draft.model_card_data
        card_data.training_steps, card_data.seed = self.state.global_step, self.args.seed
        return output

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        loss_mask = inputs.get("loss_mask")
        if loss_mask is None:
            loss_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        training = model.training
        result, output, _ = compute_dspark_loss(
            model,
            self.target_model,
            input_ids,
            loss_mask,
            attention_mask,
            num_anchors=self.num_anchors,
            generator=self._anchor_generator(training),
            target_features=inputs.get("target_features"),
            target_final_hidden=inputs.get("target_final_hidden"),
        )
        self._record(result, training)
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
        self._eval_metrics.reset()
        self._eval_batch_index = 0
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
