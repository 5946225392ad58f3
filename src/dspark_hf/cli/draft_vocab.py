"""`dspark-hf draft-vocab`: [`dspark_hf.training.pipeline.apply_draft_vocabulary`] on a saved draft."""

import argparse
import sys

from .arguments import require

NAME = "draft-vocab"
HELP = "Restrict a draft's drafting to the most frequent answer tokens of its training data (a faster LM head)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", help="Saved draft (either layout).")
    parser.add_argument("--data", help="Tokenized training dataset folder (prepare-data) whose answers to count.")
    parser.add_argument("--size", type=int, default=8192, help="Tokens in the draft vocabulary.")
    parser.add_argument(
        "--held-out-data",
        help="Tokenized conversations the vocabulary is not built from: their coverage (the out-of-sample figure) "
        "is reported and noted in the model card.",
    )
    parser.add_argument("--out", help="Folder for the draft with its draft vocabulary (same layout as --draft).")


def run(args: argparse.Namespace):
    require(args, "draft", "data", "out")

    from ..formats.deepspec import is_deepspec_checkpoint
    from ..models.dspark import DSparkDraftModel
    from ..training.data import load_training_dataset
    from ..training.pipeline import apply_draft_vocabulary

    held_out = load_training_dataset(args.held_out_data) if args.held_out_data else None
    draft = DSparkDraftModel.from_pretrained(args.draft)
    token_ids, coverage = apply_draft_vocabulary(
        draft, load_training_dataset(args.data), args.size, args.data, held_out=held_out,
        held_out_source=args.held_out_data,
    )
    draft.save_pretrained(args.out, layout="deepspec" if is_deepspec_checkpoint(args.draft) else "hf")
    print(
        f"Draft vocabulary of {len(token_ids)} tokens covers {coverage:.2%} of the answer tokens in {args.data}; "
        f"saved to {args.out}",
        file=sys.stderr,
    )
    return token_ids, coverage
