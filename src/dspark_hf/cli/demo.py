"""`dspark-hf demo`: [`dspark_hf.demo.run_demo`] from the command line."""

import argparse

NAME = "demo"
HELP = "SmolLM2-135M-Instruct with the built-in draft: answers, τ, acceptance and speed-up over plain generate."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--dtype",
        default="fastest",
        help="Target and draft dtype; `fastest` (default): bfloat16 on CPUs with bf16 instructions, float32 elsewhere.",
    )
    parser.add_argument(
        "--prompt-lookup-tokens", type=int, default=10, help="Also time the draft with prompt lookup (0: skip)."
    )


def run(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    try:
        run_demo(max_new_tokens=args.max_new_tokens, dtype=args.dtype, prompt_lookup_tokens=args.prompt_lookup_tokens)
    except RuntimeError as error:
        raise SystemExit(str(error)) from error
