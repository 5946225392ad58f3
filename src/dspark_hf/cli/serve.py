"""`dspark-hf serve`: an OpenAI-compatible [`DSparkServer`] over a [`DSparkEngine`] built from the command line."""

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .arguments import add_target_arguments, require, target_from_args

if TYPE_CHECKING:
    from ..engine import DSparkEngine
    from ..engine.server import DSparkServer

NAME = "serve"
HELP = "OpenAI-compatible chat completions (POST /v1/chat/completions, GET /v1/models) over the batched DSpark engine."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--draft", default="default", help="Draft folder (either layout), 'default' or 'none'.")
    parser.add_argument(
        "--scheduler", default="prefix", choices=["prefix", "lagged", "threshold", "full", "mtp1", "none"],
        help="Verification policy: Algorithm 1 (prefix), §5.2 (lagged), threshold, full block, one token, none.",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="Confidence threshold of --scheduler threshold.")
    parser.add_argument("--cost-table", help="Cost table JSON from `dspark-hf profile` (else profiled at start-up).")
    parser.add_argument("--max-batch-size", type=int, help="Most requests decoded together (others wait).")
    parser.add_argument("--max-draft-tokens", type=int, help="Cap on drafted tokens verified per request and round.")
    parser.add_argument("--max-tokens", type=int, default=256, help="Default completion length.")
    parser.add_argument("--model-name", help="Model id served (default: --target).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads.")
    parser.add_argument("--max-prompt-tokens", type=int, help="Longest prompt accepted (default: the context window).")
    parser.add_argument(
        "--allow-special-tokens", action="store_true",
        help="Let special-token text typed in messages act as control tokens (default: it stays plain text).",
    )
    parser.add_argument("--max-connections", type=int, default=256, help="Connections served at once (then 503).")
    parser.add_argument("--max-queued-requests", type=int, default=256, help="Requests waiting for the batch (then 429).")
    parser.add_argument(
        "--api-key", default=os.environ.get("DSPARK_API_KEY"),
        help="Require `Authorization: Bearer KEY` on every request (default: $DSPARK_API_KEY, else no key).",
    )


def build_engine(args: argparse.Namespace) -> "DSparkEngine":
    """The [`DSparkEngine`] `dspark-hf serve` runs: target, draft and policy from the command line."""
    from ..default_draft import load_default_draft
    from ..engine import DSparkEngine
    from ..models.dspark import DSparkDraftModel
    from ..scheduling import CostTable, profile_draft_cost, profile_verify_cost

    target, tokenizer = target_from_args(args)
    draft = None
    if args.scheduler != "none" and args.draft != "none":
        if args.draft == "default":
            draft, description = load_default_draft(target, tokenizer)
            print(f"draft: {description}", file=sys.stderr)
        else:
            draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval()
    scheduler = "none" if draft is None else ("full" if args.scheduler == "mtp1" else args.scheduler)
    max_draft_tokens = 1 if args.scheduler == "mtp1" else args.max_draft_tokens
    policy_kwargs = {"threshold": args.threshold} if scheduler == "threshold" else {}
    cost_table = None
    if scheduler in ("prefix", "lagged"):
        if args.cost_table:
            cost_table = CostTable.load(args.cost_table)
        else:
            print("Profiling the verification and draft costs (pass --cost-table to skip)...", file=sys.stderr)
            requests = [r for r in (1, 2, 4, 8, 16, 32) if args.max_batch_size is None or r <= args.max_batch_size]
            widths = range(1, (max_draft_tokens or draft.config.block_size) + 2)
            cost_table = profile_verify_cost(target, requests, widths, repeats=3).with_draft_cost(
                *profile_draft_cost(draft, requests, repeats=3)
            )
    return DSparkEngine(
        target, draft, scheduler=scheduler, cost_table=cost_table, tokenizer=tokenizer,
        max_batch_size=args.max_batch_size, max_draft_tokens=max_draft_tokens, **policy_kwargs,
    )


def make_server(args: argparse.Namespace) -> "DSparkServer":
    """The [`DSparkServer`] of `dspark-hf serve` (not started)."""
    from ..engine.server import DSparkServer

    require(args, "target")
    return DSparkServer(
        build_engine(args), model_name=args.model_name or args.target, host=args.host, port=args.port,
        default_max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        allow_special_tokens=args.allow_special_tokens, api_key=args.api_key, max_connections=args.max_connections,
        max_queued_requests=args.max_queued_requests,
    )


def run(args: argparse.Namespace) -> None:
    server = make_server(args)
    print(f"Serving {server.model_name} on {server.url}/v1 (POST /v1/chat/completions, GET /v1/models)", file=sys.stderr)
    server.serve()
