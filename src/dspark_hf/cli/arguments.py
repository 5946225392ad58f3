"""Options and parsing helpers shared by the `dspark-hf` subcommands."""

import argparse
import json

from ..targets import load_target

__all__ = ["add_target_arguments", "parse_csv", "parse_mapping", "require", "target_from_args"]


def add_target_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
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


def target_from_args(args: argparse.Namespace, require_tokenizer: bool = True):
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


def require(args: argparse.Namespace, *names: str) -> None:
    """Exits naming the options among `names` (destinations) that are unset or empty."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise SystemExit(f"dspark-hf {args.command}: missing required option(s) {', '.join(missing)}.")


def parse_mapping(value) -> dict:
    """A JSON object option (a dict already when it comes from `--config`); empty when unset."""
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    return json.loads(value)


def parse_csv(value) -> list | None:
    """A comma-separated option (a list already when it comes from `--config`) as a list; None when unset."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]
