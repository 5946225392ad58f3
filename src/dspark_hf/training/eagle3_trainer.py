"""`Eagle3Trainer`: trains an EAGLE-3 draft against a frozen target with the shared [`DraftTrainer`] machinery.

Per batch: the frozen target runs once (no grad; or its features come from a target cache) and gives the fused
features of the draft's `target_layer_ids` `(B, S, m·d)` and its final-norm hidden states `(B, S, d)`, whose LM-head
logits are the soft targets; the draft runs its training-time test over whole sequences
([`Eagle3DraftModel.ttt_forward`], `ttt_length` steps) and the loss is [`eagle3_loss`] with the config's
`step_loss_decay`.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..models.eagle3.modeling_eagle3 import Eagle3DraftModel, Eagle3TTTOutput
from .base_trainer import DraftTrainer, DraftTrainingArguments, target_inputs, unwrap_draft
from .eagle3_losses import Eagle3LossOutput, Eagle3MetricAccumulator, eagle3_loss

__all__ = ["Eagle3Trainer", "Eagle3TrainingArguments", "compute_eagle3_loss"]

# EAGLE-3 takes its loss settings (`ttt_length`, `step_loss_decay`) from the draft's config: no options of its own.
Eagle3TrainingArguments = DraftTrainingArguments


def compute_eagle3_loss(
    model: nn.Module,
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    target_features: torch.Tensor | None = None,
    target_final_hidden: torch.Tensor | None = None,
    draft_context: AbstractContextManager | None = None,
) -> tuple[Eagle3LossOutput, Eagle3TTTOutput]:
    """The EAGLE-3 loss of one batch of right-padded sequences (what [`Eagle3Trainer`] runs).

    Args:
        model: the [`Eagle3DraftModel`], or a wrapper around it (DDP, PEFT): its TTT forward runs through the
            wrapper, once over the whole batch (`config.ttt_length` steps).
        target: the frozen target; runs once under `no_grad` unless the features are given.
        input_ids, loss_mask, attention_mask: `(B, S)` tokens, 1 on supervised (assistant) tokens, 1 on real tokens
            (None: all real).
        target_features, target_final_hidden: `(B, S, m·d)` and `(B, S, d)` from a target cache
            ([`TargetCacheDataset`]): the target's forward is skipped; its LM head still gives the soft targets.
        draft_context: a context manager around the draft's forward only (the trainer passes accelerate's
            mixed-precision autocast, which the target's forward and the loss stay out of).

    With a draft vocabulary, draft and target logits cover its tokens only (the target distribution is the
    softmax over them, i.e. restricted and renormalised), as the draft drafts at inference.
    """
    draft = unwrap_draft(model, Eagle3DraftModel)
    config = draft.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        features, final_hidden = target_inputs(
            target, input_ids, attention_mask, config.target_layer_ids, target_features, target_final_hidden
        )
        target_logits = draft.lm_head_logits(final_hidden, draft_vocabulary=True)
    with draft_context or nullcontext():  # through the wrappers (DDP, PEFT), so they see the training forward
        output = model(
            input_ids=input_ids, target_hidden_states=features, attention_mask=attention_mask,
            ttt_length=config.ttt_length, draft_vocabulary=True,
        )
    loss = eagle3_loss(
        output.logits, target_logits, loss_mask, attention_mask, step_loss_decay=config.step_loss_decay
    )
    return loss, output


class Eagle3Trainer(DraftTrainer):
    """A [`Trainer`] for EAGLE-3 drafts: [`DraftTrainer`] (frozen target, target cache, eval loop, checkpoints,
    DDP, PEFT) with the EAGLE-3 loss step [`compute_eagle3_loss`].

    Args:
        model: an [`Eagle3DraftModel`] (e.g. `Eagle3DraftModel.from_target(target, ttt_length=7)`), or a
            `peft.PeftModel` around one. It is attached to `target_model` if it is not already.
        target_model: the frozen target causal LM (frozen here, never optimised, never saved).
        args: [`Eagle3TrainingArguments`] (= [`DraftTrainingArguments`]) or plain `TrainingArguments`;
            `ttt_length` and `step_loss_decay` come from the draft's config.
        Everything else as for [`DSparkTrainer`]: datasets of `input_ids` and `loss_mask`, or a
        [`TargetCacheDataset`] built for the draft's `target_layer_ids`.

    Logged alongside `loss` (and with the `eval_` prefix by `evaluate()`), for TTT steps k = 1..T: `ce_k`,
    `accuracy_k`, `acceptance_k`, and `tau_greedy`, `expected_tau` (see [`Eagle3MetricAccumulator`]).
    """

    draft_class = Eagle3DraftModel
    default_args_class = Eagle3TrainingArguments

    @property
    def draft(self) -> Eagle3DraftModel:
        """The bare draft (inside any PEFT / DDP wrapper)."""
        return unwrap_draft(self.model, Eagle3DraftModel)

    def new_metrics(self) -> Eagle3MetricAccumulator:
        return Eagle3MetricAccumulator(unwrap_draft(self.model, Eagle3DraftModel).config.ttt_length)

    def draft_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], training: bool
    ) -> tuple[Eagle3LossOutput, Eagle3TTTOutput]:
        loss_mask, attention_mask = self.batch_masks(inputs)
        return compute_eagle3_loss(
            model,
            self.target_model,
            inputs["input_ids"],
            loss_mask,
            attention_mask,
            target_features=inputs.get("target_features"),
            target_final_hidden=inputs.get("target_final_hidden"),
            # The routed TTT forward bypasses the mixed-precision forward accelerate gave the draft.
            draft_context=self.accelerator.autocast(),
        )
