"""`dspark-hf profile`: the target's cost table (and a draft's pass time) with the `dspark_hf.scheduling` profilers."""

import argparse

from .arguments import require

NAME = "profile"
HELP = (
    "Profile the target's SPS cost table (forwards per second at B tokens) for the prefix scheduler, and optionally "
    "a draft's pass time."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace):
    require(args, "target", "out")
    contexts = args.context_length
    if args.shape == "RxW" and len(contexts) > 1:
        raise SystemExit("--shape RxW profiles one context length; run it once per --context-length.")
    import torch

    from ..scheduling import profile_cost_table, profile_verify_cost
    from ..targets import load_target

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
        from ..models.dspark import DSparkDraftModel
        from ..scheduling import profile_draft_cost

        draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval()
        table = table.with_draft_cost(
            *profile_draft_cost(draft, args.draft_requests, contexts[0], repeats=args.repeats, warmup=args.warmup)
        )
        table.metadata["draft"] = args.draft
    table.metadata["threads"] = torch.get_num_threads()
    table.save(args.out)
    if args.plot:
        from ..scheduling import plot_cost_table

        plot_cost_table(table, args.plot)
    print(table)
    return table
