"""`dspark-hf eval`: [`dspark_hf.evaluation.evaluate`] on folders of JSONL prompt sets, with a summary and a table."""

import argparse
import json
from pathlib import Path

from .arguments import add_target_arguments, require, target_from_args

NAME = "eval"
HELP = "τ, per-position acceptance and speed of a draft against plain generate and prompt lookup on JSONL prompt sets."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--draft", help="Saved draft (either layout).")
    parser.add_argument("--prompts-dir", help="Folder of <dataset>.jsonl prompt files (a `turns` list per line).")
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
        help="With --draft-lookup-tokens: the draft probability the next token of a 1-token lookup match needs to "
        "be verified (generate's lookup_min_probability; 0: every match; default: 0.01).",
    )
    parser.add_argument("--no-plain", action="store_true", help="Skip the plain-generate baseline.")
    parser.add_argument("--out", required=False, help="Output folder (per-dataset JSON, summary.json, table.md).")


def run(args: argparse.Namespace):
    require(args, "target", "draft", "prompts_dir", "out")
    import torch

    from ..evaluation import domain_summaries, evaluate, load_prompt_sets, markdown_table
    from ..models.dspark import DSparkDraftModel

    prompt_sets = load_prompt_sets(args.prompts_dir, args.datasets, args.limit)  # bad prompts fail before loading
    target, tokenizer = target_from_args(args)
    draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval()
    draft_generate_kwargs = {}
    if args.lookup_min_probability is not None:
        draft_generate_kwargs["lookup_min_probability"] = args.lookup_min_probability
    torch.manual_seed(0)
    summaries = evaluate(
        target, tokenizer, draft, prompt_sets, output_dir=args.out,
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        compare_plain=not args.no_plain, prompt_lookup_num_tokens=args.prompt_lookup_tokens or None,
        draft_prompt_lookup_num_tokens=args.draft_lookup_tokens, draft_generate_kwargs=draft_generate_kwargs,
    )
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    report = {"datasets": summaries, "domains": domain_summaries(summaries), "settings": settings}
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(markdown_table(summaries))
    print(markdown_table(summaries))
    return report
