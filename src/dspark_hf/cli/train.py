"""`dspark-hf train`: [`dspark_hf.training.pipeline.train`] from the command line."""

import argparse
import json
import os
import sys

from ..targets import check_local_path
from .arguments import add_target_arguments, parse_csv, parse_mapping, require, target_from_args

NAME = "train"
HELP = "Train a DSpark or EAGLE-3 draft (or a LoRA adapter on one) against a frozen target."

DRAFT_TYPES = ("dspark", "eagle3")

# DSparkDraftConfig fields settable as options (`--num-draft-layers` sets `num_hidden_layers`, for both families).
DRAFT_OPTIONS = {
    "block_size": int,
    "num_draft_layers": int,
    "markov_head_type": str,
    "markov_rank": int,
    "mask_token_id": int,
    "ce_loss_weight": float,
    "tv_loss_weight": float,
    "confidence_loss_weight": float,
    "loss_position_decay": float,
}

# Eagle3DraftConfig fields settable as options.
EAGLE3_OPTIONS = {
    "ttt_length": int,
    "step_loss_decay": float,
}

# Options of one family only (destinations), refused for the other when given (on the command line or in --config).
DSPARK_ONLY = [*(k for k in DRAFT_OPTIONS if k != "num_draft_layers"), "no_confidence_head", "num_anchors"]
EAGLE3_ONLY = list(EAGLE3_OPTIONS)

# DSparkTrainingArguments fields settable as options (any other through `--training-args`).
TRAINING_OPTIONS = {
    "num_train_epochs": float,
    "max_steps": int,
    "per_device_train_batch_size": int,
    "per_device_eval_batch_size": int,
    "gradient_accumulation_steps": int,
    "learning_rate": float,
    "weight_decay": float,
    "warmup_steps": float,
    "lr_scheduler_type": str,
    "max_grad_norm": float,
    "logging_steps": float,
    "save_steps": float,
    "eval_steps": float,
    "save_total_limit": int,
    "dataloader_num_workers": int,
    "report_to": str,
    "num_anchors": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser, device=False)  # the trainer puts the target on accelerate's device
    parser.add_argument("--data", help="Tokenized dataset folder (prepare-data) or a conversations JSONL.")
    parser.add_argument("--eval-data", help="Held-out dataset (same formats); never the benchmark sets.")
    parser.add_argument(
        "--eval-fraction", type=float, default=0.0, help="Split this share of --data off for eval."
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument(
        "--target-cache", help="Cached target features of --data (dspark-hf cache-features): no target forward."
    )
    parser.add_argument("--output-dir", help="Checkpoints and the final draft go here.")
    parser.add_argument("--draft", help="Start from this saved draft instead of a fresh one.")
    parser.add_argument("--draft-dtype", default="float32", help="dtype of the trainable draft weights.")
    parser.add_argument(
        "--draft-vocab-size",
        type=int,
        help="Train (and later draft) over the N most frequent answer tokens of --data only: a faster LM head.",
    )
    parser.add_argument(
        "--draft-type",
        choices=DRAFT_TYPES,
        help="Draft family of a fresh draft: dspark (default) or eagle3; with --draft, the saved draft's family.",
    )
    group = parser.add_argument_group(
        "draft (fresh drafts only; with --draft, --num-draft-layers adds layers to a DSpark draft)"
    )
    for name, kind in DRAFT_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind)
    group.add_argument(
        "--target-layer-ids",
        help="Comma-separated target layers for the context features (default: 5 spread layers for DSpark, a low, "
        "a middle and a high one for EAGLE-3).",
    )
    group.add_argument("--no-confidence-head", action="store_true")
    group.add_argument("--ttt-length", type=int, help="EAGLE-3: training-time-test steps (default 7).")
    group.add_argument(
        "--step-loss-decay", type=float, help="EAGLE-3: TTT step k's loss weighs decay**k (default 0.8)."
    )
    group.add_argument("--draft-config", help="JSON of any other DSparkDraftConfig / Eagle3DraftConfig fields.")
    group = parser.add_argument_group("training (any other TrainingArguments field via --training-args)")
    for name, kind in TRAINING_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--bf16", action="store_true", help="bf16 mixed precision for the draft.")
    group.add_argument(
        "--eval-strategy", default=None, help="no, steps or epoch (default: steps when eval data)."
    )
    group.add_argument("--resume-from-checkpoint", help="Checkpoint folder, or 'latest'.")
    group.add_argument("--training-args", help="JSON of extra DSparkTrainingArguments fields.")
    group.add_argument("--threads", type=int, help="torch.set_num_threads.")
    group = parser.add_argument_group("PEFT (LoRA on an existing --draft)")
    group.add_argument(
        "--lora-r", type=int, help="Train a LoRA adapter of this rank instead of the full draft."
    )
    group.add_argument("--lora-alpha", type=float)
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument("--lora-target-modules", default="q_proj,v_proj")


def _draft_type(args: argparse.Namespace) -> str:
    """The draft family: `--draft-type`, else that of `--draft`, else dspark. Refuses the options of the other
    family that were given, naming them."""
    from ..training.pipeline import draft_type_of

    draft_type = args.draft_type or (draft_type_of(args.draft) if args.draft else "dspark")
    if args.draft and args.draft_type and draft_type_of(args.draft) != args.draft_type:
        raise SystemExit(
            f"dspark-hf train: --draft {args.draft} is a {draft_type_of(args.draft)} draft but --draft-type is "
            f"{args.draft_type}. Leave --draft-type out to continue it."
        )
    other = DSPARK_ONLY if draft_type == "eagle3" else EAGLE3_ONLY
    given = [f"--{k.replace('_', '-')}" for k in other if getattr(args, k, None) not in (None, False)]
    if given:
        family, fix = ("DSpark", "drop them") if draft_type == "eagle3" else ("EAGLE-3", "pass --draft-type eagle3")
        raise SystemExit(
            f"dspark-hf train: {', '.join(given)} only configure{'s' if len(given) == 1 else ''} {family} drafts, "
            f"and this draft is {'an EAGLE-3' if draft_type == 'eagle3' else 'a DSpark'} one; {fix}."
        )
    return draft_type


def _draft_config(args: argparse.Namespace) -> dict:
    """The fresh draft's DSparkDraftConfig / Eagle3DraftConfig overrides given on the command line (none apply to
    `--draft`)."""
    options = [*DRAFT_OPTIONS, *EAGLE3_OPTIONS]
    overrides = {k: getattr(args, k) for k in options if k != "num_draft_layers" and getattr(args, k) is not None}
    if args.target_layer_ids:
        overrides["target_layer_ids"] = [int(i) for i in parse_csv(args.target_layer_ids)]
    if args.no_confidence_head:
        overrides["confidence_head"] = False
    overrides.update(parse_mapping(args.draft_config))
    return overrides


def _training_args(args: argparse.Namespace) -> dict:
    """The DSparkTrainingArguments fields given on the command line (`--training-args` wins)."""
    training = {k: getattr(args, k) for k in TRAINING_OPTIONS if getattr(args, k, None) is not None}
    if args.bf16:
        training["bf16"] = True
    if args.eval_strategy:
        training["eval_strategy"] = args.eval_strategy
    training.update(parse_mapping(args.training_args))
    return training


def _lora_config(args: argparse.Namespace):
    if not args.lora_r:
        return None
    from peft import LoraConfig

    if not args.draft:
        print("Warning: --lora-r on a freshly initialised draft; pass --draft to adapt a trained one.", file=sys.stderr)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha or 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=parse_csv(args.lora_target_modules),
    )


def run(args: argparse.Namespace):
    require(args, "target", "data", "output_dir")
    if args.draft_vocab_size is not None and args.draft_vocab_size < 1:
        raise SystemExit(
            f"--draft-vocab-size must be a positive number of tokens (e.g. 8192), got {args.draft_vocab_size}; "
            "leave it out to train over the whole vocabulary."
        )
    for option in ("data", "eval_data", "target_cache"):  # local inputs, checked before the target loads
        path = getattr(args, option)
        if path and not os.path.exists(path):
            raise SystemExit(f"dspark-hf train: --{option.replace('_', '-')} {path} does not exist.")
    if args.draft:
        check_local_path(args.draft, "draft")  # a Hub id passes
    draft_type = _draft_type(args)
    from ..training.pipeline import build_training_draft, load_training_datasets, train

    target, tokenizer = target_from_args(args, require_tokenizer=False)
    train_dataset, eval_dataset = load_training_datasets(
        args.data, tokenizer, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
        max_length=args.max_length, target_cache=args.target_cache, seed=args.seed,
    )
    try:
        draft = build_training_draft(
            target, tokenizer, args.draft, draft_type=draft_type, num_draft_layers=args.num_draft_layers,
            config_overrides=None if args.draft else _draft_config(args), seed=args.seed,
        )
    except ValueError as error:
        raise SystemExit(f"dspark-hf train: {error}") from error
    result = train(
        target, train_dataset, args.output_dir, tokenizer=tokenizer, eval_dataset=eval_dataset, draft=draft,
        draft_vocab_size=args.draft_vocab_size, vocabulary_source=args.data, draft_dtype=args.draft_dtype,
        peft_config=_lora_config(args), training_args=_training_args(args),
        resume_from_checkpoint=args.resume_from_checkpoint, seed=args.seed,
    )
    print(json.dumps(result.metrics, indent=2), file=sys.stderr)
    return result.trainer
