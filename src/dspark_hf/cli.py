"""`dspark-hf` command line.

Subcommands live in a registry (`COMMANDS`); add one with [`register_command`]:

    def add_arguments(parser): parser.add_argument("--foo")
    def run(args): ...
    register_command("my-command", "What it does.", add_arguments, run)

Every subcommand accepts `--config FILE` (JSON, or YAML when PyYAML is installed): its keys are the option names
(`max_new_tokens` or `max-new-tokens`) and set defaults that explicit command-line flags override.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .targets import load_target, parse_dtype

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "load_config",
    "main",
    "register_command",
    "run_command",
]


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any],
) -> None:
    """Adds (or replaces) a `dspark-hf <name>` subcommand."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


def load_config(path: str | os.PathLike) -> dict:
    """A flat option mapping from a JSON or YAML file (YAML needs PyYAML)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:  # pragma: no cover
            raise SystemExit(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON."
            ) from error
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path} must hold a mapping of option names to values.")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark-hf", description="DSpark speculative decoding for transformers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser._dspark_subparsers = {}
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        sub.add_argument(
            "--config", help="JSON/YAML file of option defaults (command-line flags override it)."
        )
        command.add_arguments(sub)
        sub.set_defaults(_command=command)
        parser._dspark_subparsers[command.name] = sub
    return parser


def _apply_config(sub: argparse.ArgumentParser, config: dict) -> None:
    dests = {action.dest for action in sub._actions}
    defaults = {}
    for key, value in config.items():
        dest = key.replace("-", "_")
        if dest not in dests or dest in ("help", "config"):
            raise SystemExit(f"--config: unknown option {key!r} for this command.")
        defaults[dest] = value
    sub.set_defaults(**defaults)


def run_command(argv: list[str] | None = None) -> Any:
    """Parses `argv` like `dspark-hf` and returns the subcommand's result (e.g. the trainer of `train`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return None
    if args.config:
        _apply_config(parser._dspark_subparsers[args.command], load_config(args.config))
        args = parser.parse_args(argv)
    return args._command.run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dspark-hf` console script; returns the exit status (results: [`run_command`]).

    A subcommand that returns an `int` sets the exit status; any other result means success.
    """
    result = run_command(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------------

def _add_target_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The options naming the target; `device=False` for commands whose device accelerate chooses (train)."""
    group = parser.add_argument_group("target")
    group.add_argument("--target", help="Target causal LM: Hub id, local folder, .gguf file, or 'smollm2'.")
    group.add_argument("--gguf-file", help="GGUF file name inside --target (a folder or Hub repo).")
    group.add_argument("--tokenizer", help="Tokenizer to use instead of the target's.")
    group.add_argument("--target-dtype", default="auto", help="auto, float32, bfloat16 or float16.")
    if device:
        group.add_argument(
            "--device",
            help="Where the target (and draft) run: cpu, cuda, cuda:1, or auto (every visible GPU, through "
            "accelerate's device_map). Default: cpu.",
        )


def _target_from_args(args: argparse.Namespace, require_tokenizer: bool = True):
    """Applies `--threads`, then loads `(target, tokenizer)` from the `--target` options (see [`load_target`])."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_target(
        args.target,
        args.gguf_file,
        args.target_dtype,
        args.tokenizer,
        require_tokenizer=require_tokenizer,
        device=getattr(args, "device", None),
    )


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise SystemExit(f"dspark-hf {args.command}: missing required option(s) {', '.join(missing)}.")


def _parse_mapping(value) -> dict:
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    return json.loads(value)


def _csv(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------------------------------
# prepare-data
# ----------------------------------------------------------------------------------------------------------------------


def _add_prepare_data_arguments(parser: argparse.ArgumentParser) -> None:
    _add_target_arguments(parser)
    parser.add_argument(
        "--prompts", help="Prompts: JSONL (`turns`/`messages`/`prompt`) or a save_to_disk folder."
    )
    parser.add_argument("--output", help="Folder for the tokenized dataset (datasets.save_to_disk).")
    parser.add_argument(
        "--responses", help="Conversations JSONL (default: <output>.responses.jsonl); resumable."
    )
    parser.add_argument("--num-prompts", type=int, help="Use at most this many prompts.")
    parser.add_argument(
        "--skip-prompts", type=int, default=0,
        help="Leave out the first N prompts (after --shuffle): parallel workers take disjoint slices of one order.",
    )
    parser.add_argument("--categories", help="Comma-separated `category` values to keep.")
    parser.add_argument(
        "--shuffle", action="store_true", help="Shuffle prompts (with --seed) before --num-prompts."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=2048, help="Truncate tokenized conversations.")
    parser.add_argument(
        "--max-prompt-tokens", type=int, help="Skip longer prompts (default: max-length − 64)."
    )
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument(
        "--greedy", action="store_true", help="Greedy decoding instead of the target's settings."
    )
    parser.add_argument("--generation-kwargs", help="JSON of extra generate() settings.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads.")
    parser.add_argument("--no-progress", action="store_true")


def _run_prepare_data(args: argparse.Namespace):
    _require(args, "target", "prompts", "output")

    from .training.data import build_training_dataset, load_prompts

    target, tokenizer = _target_from_args(args)
    prompts = load_prompts(
        args.prompts,
        limit=args.num_prompts,
        offset=args.skip_prompts,
        categories=_csv(args.categories),
        shuffle=args.shuffle,
        seed=args.seed,
    )
    generation = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.greedy:
        generation = {"do_sample": False}
    generation.update(_parse_mapping(args.generation_kwargs))
    dataset = build_training_dataset(
        target,
        tokenizer,
        prompts,
        args.output,
        responses_path=args.responses,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generation_kwargs=generation,
        seed=args.seed,
        progress=not args.no_progress,
        **({"max_prompt_tokens": args.max_prompt_tokens} if args.max_prompt_tokens else {}),
    )
    print(f"Saved {len(dataset)} tokenized conversations to {args.output}", file=sys.stderr)
    return dataset


# ----------------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------------

_DRAFT_OPTIONS = {
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

_TRAINING_OPTIONS = {
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


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_target_arguments(parser, device=False)  # the trainer puts the target on accelerate's device
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
    group = parser.add_argument_group("draft (fresh drafts only; with --draft, --num-draft-layers adds layers)")
    for name, kind in _DRAFT_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind)
    group.add_argument("--target-layer-ids", help="Comma-separated target layers for the context features.")
    group.add_argument("--no-confidence-head", action="store_true")
    group.add_argument("--draft-config", help="JSON of any other DSparkDraftConfig fields.")
    group = parser.add_argument_group("training (any other TrainingArguments field via --training-args)")
    for name, kind in _TRAINING_OPTIONS.items():
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


def _deepen(draft, num_layers: int | None) -> None:
    """`--draft` with `--num-draft-layers`: appends identity-initialised layers up to that depth."""
    current = draft.config.num_hidden_layers
    if num_layers is None or num_layers == current:
        return
    if num_layers < current:
        raise SystemExit(
            f"--num-draft-layers {num_layers} is below the {current} layers of --draft; layers can only be added. "
            "Leave it out to keep the draft's depth, or train a fresh draft without --draft."
        )
    draft.add_layers(num_layers - current)
    print(f"Added {num_layers - current} identity-initialised layer(s) to the draft ({num_layers} now).", file=sys.stderr)


def _run_train(args: argparse.Namespace):
    _require(args, "target", "data", "output_dir")
    if args.draft_vocab_size is not None and args.draft_vocab_size < 1:
        raise SystemExit(
            f"--draft-vocab-size must be a positive number of tokens (e.g. 8192), got {args.draft_vocab_size}; "
            "leave it out to train over the whole vocabulary."
        )
    import torch

    from .models.dspark.modeling_dspark import DSparkDraftModel
    from .training.data import load_training_dataset
    from .training.target_cache import TargetCacheDataset
    from .training.trainer import DSparkTrainer, DSparkTrainingArguments

    target, tokenizer = _target_from_args(args, require_tokenizer=False)
    train_dataset = load_training_dataset(args.data, tokenizer, max_length=args.max_length)
    eval_dataset = (
        load_training_dataset(args.eval_data, tokenizer, args.max_length) if args.eval_data else None
    )
    if args.target_cache:
        train_dataset = TargetCacheDataset(train_dataset, args.target_cache)
    if eval_dataset is None and args.eval_fraction:
        if args.target_cache:
            train_dataset, eval_dataset = train_dataset.split(args.eval_fraction, seed=args.seed)
        else:
            split = train_dataset.train_test_split(test_size=args.eval_fraction, seed=args.seed)
            train_dataset, eval_dataset = split["train"], split["test"]

    if args.draft:
        draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target)
        _deepen(draft, args.num_draft_layers)
    else:
        overrides = {k: getattr(args, k) for k in _DRAFT_OPTIONS if getattr(args, k, None) is not None}
        if "num_draft_layers" in overrides:
            overrides["num_hidden_layers"] = overrides.pop("num_draft_layers")
        if args.target_layer_ids:
            overrides["target_layer_ids"] = [int(i) for i in _csv(args.target_layer_ids)]
        if args.no_confidence_head:
            overrides["confidence_head"] = False
        overrides.update(_parse_mapping(args.draft_config))
        torch.manual_seed(args.seed)
        draft = DSparkDraftModel.from_target(target, tokenizer=tokenizer, **overrides)
    if args.target_cache:
        train_dataset.check_target_layer_ids(draft.config.target_layer_ids)
    if args.draft_vocab_size is not None:
        counted = train_dataset
        if isinstance(counted, TargetCacheDataset):
            counted = counted.dataset.select(counted.indices)  # the training split's token ids
        _, coverage = _apply_draft_vocabulary(draft, counted, args.draft_vocab_size, args.data)
        print(f"Draft vocabulary of {args.draft_vocab_size} tokens covers {coverage:.2%} of the answers.", file=sys.stderr)
    # Trainable weights stay in their own dtype (float32 by default) even when the target runs in bf16; use --bf16
    # for mixed-precision compute.
    draft_dtype = parse_dtype(args.draft_dtype)
    if draft_dtype != "auto":
        draft.to(draft_dtype)
    model = draft
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        if not args.draft:
            print(
                "Warning: --lora-r on a freshly initialised draft; pass --draft to adapt a trained one.",
                file=sys.stderr,
            )
        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha or 2 * args.lora_r,
            lora_dropout=args.lora_dropout,
            target_modules=_csv(args.lora_target_modules),
        )
        model = get_peft_model(draft, lora)

    training = {k: getattr(args, k) for k in _TRAINING_OPTIONS if getattr(args, k, None) is not None}
    if args.bf16:
        training["bf16"] = True
    eval_strategy = args.eval_strategy or (
        "steps" if eval_dataset is not None and "eval_steps" in training else None
    )
    if eval_strategy is None and eval_dataset is not None:
        eval_strategy = "epoch"
    if eval_strategy:
        training["eval_strategy"] = eval_strategy
    training.update(_parse_mapping(args.training_args))
    training_args = DSparkTrainingArguments(output_dir=args.output_dir, seed=args.seed, **training)
    trainer = DSparkTrainer(
        model=model,
        args=training_args,
        target_model=target,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = True
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    print(json.dumps(metrics, indent=2), file=sys.stderr)
    return trainer


register_command(
    "prepare-data",
    "Regenerate responses to training prompts with the target and tokenize them for draft training.",
    _add_prepare_data_arguments,
    _run_prepare_data,
)


def _add_cache_features_arguments(parser: argparse.ArgumentParser) -> None:
    _add_target_arguments(parser)
    parser.add_argument("--data", help="Tokenized dataset folder (prepare-data) or a conversations JSONL.")
    parser.add_argument("--output", help="Cache folder (resumable).")
    parser.add_argument("--max-length", type=int, default=2048, help="Same value as for `train`.")
    parser.add_argument(
        "--target-layer-ids", help="Comma-separated layers (default: from --draft, else the draft default)."
    )
    parser.add_argument("--draft", help="A saved draft whose target_layer_ids to cache.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64, help="Examples per safetensors shard.")
    parser.add_argument("--dtype", default="bfloat16", help="Storage dtype of the cached features.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads.")
    parser.add_argument("--no-progress", action="store_true")


def _run_cache_features(args: argparse.Namespace):
    _require(args, "target", "data", "output")

    from .models.dspark.configuration_dspark import DSparkDraftConfig
    from .targets import default_target_layer_ids
    from .training.data import load_training_dataset
    from .training.target_cache import build_target_cache

    target, tokenizer = _target_from_args(args, require_tokenizer=False)
    if args.target_layer_ids:
        layer_ids = [int(i) for i in _csv(args.target_layer_ids)]
    elif args.draft:
        layer_ids = DSparkDraftConfig.from_pretrained(args.draft).target_layer_ids
    else:
        layer_ids = default_target_layer_ids(target.config.get_text_config().num_hidden_layers)
    dataset = load_training_dataset(args.data, tokenizer, max_length=args.max_length)
    path = build_target_cache(
        target,
        dataset,
        layer_ids,
        args.output,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=parse_dtype(args.dtype),
        progress=not args.no_progress,
    )
    print(f"Cached target layers {layer_ids} of {len(dataset)} examples in {path}", file=sys.stderr)
    return path


register_command(
    "cache-features",
    "Run the target once over a tokenized dataset and store its features for `train --target-cache`.",
    _add_cache_features_arguments,
    _run_cache_features,
)


def _apply_draft_vocabulary(draft, dataset, size: int, data_name: str) -> tuple[list[int], float]:
    """Sets the `size` most frequent answer tokens of `dataset` (end-of-turn ids always) as `draft`'s draft
    vocabulary and notes the coverage in its model card."""
    from .training.data import frequent_token_ids

    eos = draft.config.eos_token_id
    always = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    token_ids, coverage = frequent_token_ids(dataset, size, always_include=always)
    draft.set_draft_vocabulary(token_ids)
    note = f"Draft vocabulary: {len(token_ids)} tokens, covering {coverage:.2%} of the answer tokens of {data_name}."
    draft.model_card_data.notes = "\n\n".join(filter(None, [draft.model_card_data.notes, note]))
    return token_ids, coverage


def _add_draft_vocab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", help="Saved draft (either layout).")
    parser.add_argument("--data", help="Tokenized training dataset folder (prepare-data) whose answers to count.")
    parser.add_argument("--size", type=int, default=8192, help="Tokens in the draft vocabulary.")
    parser.add_argument("--out", help="Folder for the draft with its draft vocabulary (same layout as --draft).")


def _run_draft_vocab(args: argparse.Namespace):
    _require(args, "draft", "data", "out")

    from .formats.deepspec import is_deepspec_checkpoint
    from .models.dspark.modeling_dspark import DSparkDraftModel
    from .training.data import load_training_dataset

    draft = DSparkDraftModel.from_pretrained(args.draft)
    token_ids, coverage = _apply_draft_vocabulary(draft, load_training_dataset(args.data), args.size, args.data)
    draft.save_pretrained(args.out, layout="deepspec" if is_deepspec_checkpoint(args.draft) else "hf")
    print(
        f"Draft vocabulary of {len(token_ids)} tokens covers {coverage:.2%} of the answer tokens in {args.data}; "
        f"saved to {args.out}",
        file=sys.stderr,
    )
    return token_ids, coverage


register_command(
    "draft-vocab",
    "Restrict a draft's drafting to the most frequent answer tokens of its training data (a faster LM head).",
    _add_draft_vocab_arguments,
    _run_draft_vocab,
)
register_command(
    "train",
    "Train a DSpark draft (or a LoRA adapter on one) against a frozen target.",
    _add_train_arguments,
    _run_train,
)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import add_arguments

    add_arguments(parser)


def _run_demo(args: argparse.Namespace):
    from .demo import run

    return run(args)


register_command(
    "demo",
    "SmolLM2-135M-Instruct with the built-in draft: answers, τ, acceptance and speed-up over plain generate.",
    _add_demo_arguments,
    _run_demo,
)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_target_arguments(parser)
    parser.add_argument("--draft", help="Saved draft (either layout).")
    parser.add_argument("--prompts-dir", default="../shared/data/eval", help="Folder of <dataset>.jsonl prompt files.")
    parser.add_argument("--datasets", nargs="*", help="Dataset names (default: every .jsonl in --prompts-dir).")
    parser.add_argument("--limit", type=int, default=10, help="Prompts per dataset.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="Sample at --temperature instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="0 skips the prompt-lookup baseline.")
    parser.add_argument(
        "--draft-lookup-tokens",
        type=int,
        help="Give the draft's generate() prompt_lookup_num_tokens=N: rounds verify a prompt-lookup continuation "
        "when the text so far has one (see --lookup-min-probability) and a drafted block otherwise.",
    )
    parser.add_argument(
        "--lookup-min-probability",
        type=float,
        help="With --draft-lookup-tokens: draft.lookup_min_probability, the draft probability the next token of a "
        "1-token lookup match needs to be verified (0: every match; default: the draft's, 0.01).",
    )
    parser.add_argument("--no-plain", action="store_true", help="Skip the plain-generate baseline.")
    parser.add_argument("--out", required=False, help="Output folder (per-dataset JSON, summary.json, table.md).")


def _run_eval(args: argparse.Namespace):
    import torch

    from .evaluation import domain_summaries, evaluate, load_prompt_sets, markdown_table
    from .models.dspark.modeling_dspark import DSparkDraftModel

    _require(args, "target", "draft", "out")
    target, tokenizer = _target_from_args(args)
    draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval()
    if args.lookup_min_probability is not None:
        draft.lookup_min_probability = args.lookup_min_probability
    torch.manual_seed(0)
    summaries = evaluate(
        target, tokenizer, draft, load_prompt_sets(args.prompts_dir, args.datasets, args.limit), output_dir=args.out,
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        compare_plain=not args.no_plain, prompt_lookup_num_tokens=args.prompt_lookup_tokens or None,
        draft_prompt_lookup_num_tokens=args.draft_lookup_tokens,
    )
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    report = {"datasets": summaries, "domains": domain_summaries(summaries), "settings": settings}
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(markdown_table(summaries))
    print(markdown_table(summaries))
    return report


register_command(
    "eval",
    "τ, per-position acceptance and speed of a draft against plain generate and prompt lookup on JSONL prompt sets.",
    _add_eval_arguments,
    _run_eval,
)


# ----------------------------------------------------------------------------------------------------------------------
# calibrate / profile
# ----------------------------------------------------------------------------------------------------------------------


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_target_arguments(parser)
    parser.add_argument("--draft", help="Saved draft to calibrate (either layout).")
    parser.add_argument("--draft-dtype", default="auto", help="dtype of the draft (auto: as saved); the copy keeps it.")
    parser.add_argument(
        "--prompts", help="Held-out prompts JSONL (`turns`/`messages`/`prompt`): neither training nor benchmark prompts."
    )
    parser.add_argument("--limit", type=int, default=100, help="Use at most this many prompts.")
    parser.add_argument("--shuffle", action="store_true", help="Shuffle prompts (with --seed) before --limit.")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=1024, help="Skip prompts longer than this (chat template included)."
    )
    parser.add_argument(
        "--exclude", help="Leave out the prompts of this file/dataset (e.g. the draft's training conversations)."
    )
    parser.add_argument("--rounds", help="Refit on rounds saved by an earlier run (calibration_rounds.json).")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding (calibrate as you serve).")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--test-fraction", type=float, default=0.25, help="Share of prompts held out for the reported metrics (0: in-sample)."
    )
    parser.add_argument(
        "--cross-fit",
        type=int,
        default=0,
        metavar="K",
        help="Also report out-of-sample metrics over all rounds by K-fold cross-fitting on prompts (0: off).",
    )
    parser.add_argument("--num-bins", type=int, default=15, help="Equal-width bins of ECE and the STS objective.")
    parser.add_argument(
        "--method",
        choices=["sts", "sts_bias"],
        default="sts",
        help="sts: one temperature per position (the paper); sts_bias: a temperature and a bias per position.",
    )
    parser.add_argument(
        "--objective",
        choices=["ece", "log_loss"],
        default="ece",
        help="What each position's search minimises: the survival's ECE (the paper) or its log loss.",
    )
    parser.add_argument("--grid", help="MIN,MAX,POINTS of the log-spaced temperature grid (default 0.05,20,261).")
    parser.add_argument("--bias-grid", help="MIN,MAX,POINTS of the linear sts_bias grid (default -6,6,49).")
    parser.add_argument("--thresholds", type=float, nargs="+", help="Thresholds of the sweep (default 0, 0.1, …, 0.9).")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads.")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", help="Output folder: calibrated draft, rounds, metrics.json, report.md, PNGs.")


def _short_conversations(prompts: list[dict], tokenizer, limit: int, max_tokens: int) -> list[list[dict]]:
    """The first `limit` prompts (as chat messages) whose templated length is at most `max_tokens`."""
    from .training.data import first_turn_messages, prompt_token_count

    kept, skipped = [], 0
    for prompt in prompts:
        messages = first_turn_messages(prompt)
        if prompt_token_count(tokenizer, messages) > max_tokens:
            skipped += 1
            continue
        kept.append(messages)
        if len(kept) == limit:
            break
    if skipped:
        print(f"Skipped {skipped} prompts longer than {max_tokens} tokens (--max-prompt-tokens).", file=sys.stderr)
    return kept


def _run_calibrate(args: argparse.Namespace):
    _require(args, "draft", "out")
    if not args.rounds:
        _require(args, "target", "prompts")
    import numpy as np
    import torch

    from . import calibration
    from .models.dspark.modeling_dspark import DSparkDraftModel
    from .training.data import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = None, None
    if args.target:
        target, tokenizer = _target_from_args(args)
    draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=parse_dtype(args.draft_dtype)).eval()
    if args.rounds:
        data = calibration.CalibrationData.load(args.rounds)
    else:
        prompts = load_prompts(args.prompts, shuffle=args.shuffle, seed=args.seed, exclude=args.exclude)
        conversations = _short_conversations(prompts, tokenizer, args.limit, args.max_prompt_tokens)
        data = calibration.collect_calibration_rounds(
            target, draft, conversations, tokenizer, max_new_tokens=args.max_new_tokens,
            do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            progress=not args.no_progress,
        )
        data.metadata.update(prompts=str(args.prompts), draft=str(args.draft))
        data.save(out / "calibration_rounds.json")
    if data.block_size != draft.config.block_size:
        raise SystemExit(f"The rounds have block size {data.block_size} but the draft's is {draft.config.block_size}.")
    grid, bias_grid = calibration.DEFAULT_TEMPERATURE_GRID, calibration.DEFAULT_BIAS_GRID
    if args.grid:
        low, high, points = (float(v) for v in _csv(args.grid))
        grid = np.geomspace(low, high, int(points))
    if args.bias_grid:
        low, high, points = (float(v) for v in _csv(args.bias_grid))
        bias_grid = np.linspace(low, high, int(points))
    fit_data, test_data = data.split(args.test_fraction, args.seed)
    if not fit_data.num_rounds:
        raise SystemExit("No rounds to fit on: give more prompts or a smaller --test-fraction.")
    temperatures, biases = calibration.fit_sequential_calibration(
        fit_data, args.method, grid, bias_grid, args.objective, args.num_bins
    )
    report = calibration.calibration_report(
        fit_data,
        test_data,
        temperatures,
        args.num_bins,
        args.thresholds or calibration.DEFAULT_THRESHOLDS,
        biases=biases,
        fit={"method": args.method, "objective": args.objective},
    )
    if args.cross_fit:
        report["cross_fitted"] = calibration.cross_fitted_metrics(
            data, args.cross_fit, args.seed, args.num_bins, method=args.method, grid=grid, bias_grid=bias_grid,
            objective=args.objective,
        )
    report["settings"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    calibration.apply_calibration(draft, temperatures, biases)
    draft.model_card_data.add_calibration(report)
    draft.save_pretrained(out / "draft")
    (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    markdown = calibration.report_markdown(report)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    evaluation = test_data if report["evaluation_split"] == "test" else fit_data
    try:
        for kind in ("survival", "conditional"):
            calibration.plot_reliability_diagram(
                evaluation,
                temperatures,
                out / f"reliability_{kind}.png",
                kind=kind,
                num_bins=min(args.num_bins, 10),
                biases=biases,
            )
        calibration.plot_threshold_sweep(report["threshold_sweep"]["calibrated"], out / "threshold_sweep.png")
    except ImportError as error:
        print(f"Note: no plots ({error}).", file=sys.stderr)
    print(markdown)
    print(f"Calibrated draft saved to {out / 'draft'}", file=sys.stderr)
    return report


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="Target causal LM: Hub id, local folder, .gguf file, or 'smollm2'.")
    parser.add_argument("--gguf-file", help="GGUF file name inside --target (a folder or Hub repo).")
    parser.add_argument("--dtype", default="bfloat16", help="Target dtype: profile the one you decode in.")
    parser.add_argument("--device", help="Device to profile on (default: where the target loads).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="Tokens per forward B.")
    parser.add_argument(
        "--context-length", type=int, nargs="+", default=[256], help="Cached context; several give one row per length."
    )
    parser.add_argument(
        "--shape",
        choices=["1xB", "Bx1", "RxW"],
        default="1xB",
        help="One request of B tokens, B of one, or the DSparkEngine's R rows of W tokens (--batch-sizes are then "
        "the widths W, --requests the R; one context length).",
    )
    parser.add_argument(
        "--requests", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="Numbers of requests R (--shape RxW)."
    )
    parser.add_argument("--repeats", type=int, default=7, help="Timed forwards per size (interleaved; median kept).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smooth", choices=["none", "monotone"], default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads.")
    parser.add_argument("--out", help="Cost table JSON to write (load with CostTable.load).")
    parser.add_argument("--plot", help="Also plot the table to this PNG.")
    parser.add_argument(
        "--draft",
        help="Also time the DSparkEngine draft pass of this draft at --draft-requests requests (the prefix scheduler "
        "then counts it and skips drafting when it cannot pay).",
    )
    parser.add_argument("--draft-requests", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])


def _run_profile(args: argparse.Namespace):
    _require(args, "target", "out")
    import torch

    from .scheduling import profile_cost_table, profile_verify_cost

    contexts = args.context_length
    if args.shape == "RxW" and len(contexts) > 1:
        raise SystemExit("--shape RxW profiles one context length; run it once per --context-length.")
    if args.threads:
        torch.set_num_threads(args.threads)
    target, _ = load_target(args.target, args.gguf_file, args.dtype, require_tokenizer=False, device=args.device)
    if args.shape == "RxW":
        table = profile_verify_cost(
            target, args.requests, args.batch_sizes, contexts[0], repeats=args.repeats, warmup=args.warmup,
            smooth=args.smooth, seed=args.seed,
        )
    else:
        table = profile_cost_table(
            target, args.batch_sizes, contexts[0] if len(contexts) == 1 else contexts, repeats=args.repeats,
            warmup=args.warmup, device=args.device, shape=args.shape, smooth=args.smooth, seed=args.seed,
        )
    if args.draft:
        from .models.dspark.modeling_dspark import DSparkDraftModel
        from .scheduling import profile_draft_cost

        draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval()
        table = table.with_draft_cost(
            *profile_draft_cost(draft, args.draft_requests, contexts[0], repeats=args.repeats, warmup=args.warmup)
        )
        table.metadata["draft"] = args.draft
    table.metadata["threads"] = torch.get_num_threads()
    table.save(args.out)
    if args.plot:
        from .calibration import plot_cost_table

        plot_cost_table(table, args.plot)
    print(table)
    return table


register_command(
    "calibrate",
    "Fit the confidence head's Sequential Temperature Scaling (optionally with biases) on held-out prompts; save a "
    "calibrated draft and a report.",
    _add_calibrate_arguments,
    _run_calibrate,
)
register_command(
    "profile",
    "Profile the target's SPS cost table (forwards per second at B tokens) for the prefix scheduler, and optionally "
    "a draft's pass time.",
    _add_profile_arguments,
    _run_profile,
)


# ----------------------------------------------------------------------------------------------------------------------
# serve
# ----------------------------------------------------------------------------------------------------------------------


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .engine.server import add_arguments

    add_arguments(parser)


def _run_serve(args: argparse.Namespace):
    from .engine.server import run

    return run(args)


register_command(
    "serve",
    "OpenAI-compatible chat completions (POST /v1/chat/completions, GET /v1/models) over the batched DSpark engine.",
    _add_serve_arguments,
    _run_serve,
)


if __name__ == "__main__":  # pragma: no cover
    main()
