"""`DSparkTrainer`: trains a DSpark draft against a frozen target with `transformers.Trainer`.

Per batch (paper §3.3): the frozen target runs once (no grad) with `output_hidden_states=True`; anchors are sampled
where the next token is an assistant token; every block of the batch goes through the draft in ONE forward with
[`block_attention_mask`] (each block sees target features strictly before its anchor, exactly as at inference);
the target's LM head is applied only at the block positions; the loss is [`dspark_loss`].

The trainer machinery (frozen target, target cache, eval loop, metric logging, checkpoints, DDP, PEFT) is
[`DraftTrainer`]'s, shared with the EAGLE-3 trainer; this module adds the DSpark loss step.
"""

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..models.dspark.modeling_dspark import DSparkDraftModel, DSparkDraftOutput
from .base_trainer import DraftTrainer, DraftTrainingArguments, run_target, target_inputs, unwrap_draft
from .blocks import DSparkBlockBatch, block_attention_mask, build_blocks, sample_anchor_positions
from .losses import DSparkLossOutput, DSparkMetricAccumulator, dspark_loss

__all__ = [
    "DSparkTrainer",
    "DSparkTrainingArguments",
    "compute_dspark_loss",
    "run_target",
    "unwrap_draft",
]


@dataclass
class DSparkTrainingArguments(DraftTrainingArguments):
    """[`TrainingArguments`] with DSpark defaults and options.

    Args:
        num_anchors (`int`, defaults to 16): blocks sampled per training sequence (fewer when the sequence has
            fewer assistant positions). Loss weights, γ and the position decay come from the draft's config.
        remove_unused_columns: defaults to `False` (the draft's forward does not take dataset columns).
        ddp_find_unused_parameters: defaults to `False`: every trainable draft parameter is used in the draft's
            training forward.
    """

    num_anchors: int = field(default=16, metadata={"help": "Blocks (anchors) sampled per training sequence."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {self.num_anchors}.")


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
    draft = unwrap_draft(model, DSparkDraftModel)
    config = draft.config
    block_size = config.block_size
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, length = input_ids.shape
    with torch.no_grad():
        features, final_hidden = target_inputs(
            target, input_ids, attention_mask, config.target_layer_ids, target_features, target_final_hidden
        )
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


class DSparkTrainer(DraftTrainer):
    """A [`Trainer`] for DSpark drafts (the shared machinery is [`DraftTrainer`]'s).

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

    draft_class = DSparkDraftModel
    default_args_class = DSparkTrainingArguments

    def __init__(self, *args, **kwargs):
        self._anchor_step = -1
        self._anchor_micro_step = 0
        self._eval_batch_index = 0
        super().__init__(*args, **kwargs)

    # -- helpers ---------------------------------------------------------------------------------------------------

    @property
    def draft(self) -> DSparkDraftModel:
        """The bare draft (inside any PEFT / DDP wrapper)."""
        return unwrap_draft(self.model, DSparkDraftModel)

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

    # -- the DSpark loss step --------------------------------------------------------------------------------------

    def new_metrics(self) -> DSparkMetricAccumulator:
        return DSparkMetricAccumulator(unwrap_draft(self.model, DSparkDraftModel).config.block_size)

    def record_metrics(self, result: DSparkLossOutput, training: bool) -> None:
        statistics = result.statistics()
        if self.accelerator.num_processes > 1:
            statistics = self.accelerator.reduce(statistics, reduction="sum")
        accumulator = self._train_metrics if training else self._eval_metrics
        accumulator.add(statistics, has_confidence=result.has_confidence)

    def start_evaluation(self) -> None:
        super().start_evaluation()
        self._eval_batch_index = 0  # held-out anchors are fixed: repeated evaluations are comparable

    def draft_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], training: bool
    ) -> tuple[DSparkLossOutput, DSparkDraftOutput]:
        loss_mask, attention_mask = self.batch_masks(inputs)
        result, output, _ = compute_dspark_loss(
            model,
            self.target_model,
            inputs["input_ids"],
            loss_mask,
            attention_mask,
            num_anchors=self.num_anchors,
            generator=self._anchor_generator(training),
            target_features=inputs.get("target_features"),
            target_final_hidden=inputs.get("target_final_hidden"),
        )
        return result, output
