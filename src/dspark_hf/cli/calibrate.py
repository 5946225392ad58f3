"""`dspark-hf calibrate`: [`dspark_hf.calibration.pipeline.calibrate`] from the command line."""

import argparse
import sys
from pathlib import Path

from .arguments import add_target_arguments, parse_csv, require, target_from_args

NAME = "calibrate"
HELP = (
    "Fit the confidence head's Sequential Temperature Scaling (optionally with biases) on held-out prompts; save a "
    "calibrated draft and a report."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
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


def _grid(value, spacing) -> list[float] | None:
    """A `MIN,MAX,POINTS` option as the grid `spacing` (np.geomspace or np.linspace) lays out; None when unset."""
    if not value:
        return None
    low, high, points = (float(v) for v in parse_csv(value))
    return spacing(low, high, int(points)).tolist()


def run(args: argparse.Namespace):
    require(args, "draft", "out")
    if not args.rounds:
        require(args, "target", "prompts")
    import numpy as np
    import torch

    from ..calibration import DEFAULT_BIAS_GRID, DEFAULT_TEMPERATURE_GRID, DEFAULT_THRESHOLDS
    from ..calibration.pipeline import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.rounds:  # bad or empty prompts fail here, before any model loads
        from ..training.data import load_prompts

        if not load_prompts(args.prompts):
            raise SystemExit(f"dspark-hf calibrate: --prompts {args.prompts} holds no prompts.")
    target, tokenizer = target_from_args(args) if args.target else (None, None)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    try:
        result = calibrate(
            target, args.draft, args.prompts, tokenizer=tokenizer, draft_dtype=args.draft_dtype, rounds=args.rounds,
            limit=args.limit, shuffle=args.shuffle, exclude=args.exclude, max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, test_fraction=args.test_fraction, cross_fit=args.cross_fit,
            method=args.method, objective=args.objective, num_bins=args.num_bins,
            grid=_grid(args.grid, np.geomspace) or DEFAULT_TEMPERATURE_GRID,
            bias_grid=_grid(args.bias_grid, np.linspace) or DEFAULT_BIAS_GRID,
            thresholds=args.thresholds or DEFAULT_THRESHOLDS, settings=settings, output_dir=args.out,
            progress=not args.no_progress,
        )
    except ValueError as error:
        raise SystemExit(f"dspark-hf calibrate: {error}") from error
    print(result.markdown)
    print(f"Calibrated draft saved to {Path(args.out) / 'draft'}", file=sys.stderr)
    return result.report
