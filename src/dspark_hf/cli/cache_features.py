"""`dspark-hf cache-features`: [`dspark_hf.training.pipeline.cache_target_features`] from the command line."""

import argparse
import sys

from .arguments import add_target_arguments, parse_csv, require, target_from_args

NAME = "cache-features"
HELP = "Run the target once over a tokenized dataset and store its features for `train --target-cache`."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
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


def run(args: argparse.Namespace):
    require(args, "target", "data", "output")

    from ..training.pipeline import cache_target_features
    from ..training.target_cache import load_target_cache_info

    target, tokenizer = target_from_args(args, require_tokenizer=False)
    layer_ids = [int(i) for i in parse_csv(args.target_layer_ids)] if args.target_layer_ids else None
    path = cache_target_features(
        target,
        args.data,
        args.output,
        tokenizer=tokenizer,
        target_layer_ids=layer_ids,
        draft=args.draft,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    info = load_target_cache_info(path)
    print(
        f"Cached target layers {info['target_layer_ids']} of {info['num_examples']} examples in {path}", file=sys.stderr
    )
    return path
