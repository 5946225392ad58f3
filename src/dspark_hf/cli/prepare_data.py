"""`dspark-hf prepare-data`: the target's own answers to training prompts, tokenized for draft training."""

import argparse
import sys

from .arguments import add_target_arguments, parse_csv, parse_mapping, require, target_from_args

NAME = "prepare-data"
HELP = "Regenerate responses to training prompts with the target and tokenize them for draft training."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
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


def run(args: argparse.Namespace):
    require(args, "target", "prompts", "output")
    for name in ("num_prompts", "batch_size", "max_new_tokens", "max_length", "max_prompt_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")

    from ..training.data import build_training_dataset, load_prompts

    prompts = load_prompts(  # read (and checked) before the target loads
        args.prompts,
        limit=args.num_prompts,
        offset=args.skip_prompts,
        categories=parse_csv(args.categories),
        shuffle=args.shuffle,
        seed=args.seed,
    )
    if not prompts:
        raise ValueError(
            f"No prompts to answer in {args.prompts} (after --categories / --skip-prompts / --num-prompts): "
            "pass a file with at least one prompt row (`turns`, `messages` or `prompt`)."
        )
    target, tokenizer = target_from_args(args)
    generation = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.greedy:
        generation = {"do_sample": False}
    generation.update(parse_mapping(args.generation_kwargs))
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
