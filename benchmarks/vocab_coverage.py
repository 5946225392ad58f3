"""How much of the target's answers a draft vocabulary covers, measured out of sample.

A draft with a draft vocabulary (`set_draft_vocabulary`) can only propose its tokens, so the share of the target's
answer tokens outside it is a ceiling on acceptance at every position. This script counts that share on
conversations the vocabulary was *not* built from:

- the shipped draft's vocabulary (built from the answers to prompts 0–6000, which are not committed) on every
  committed slice of `benchmarks/data/` (prompts 6000 onwards);
- vocabularies of several sizes built from the `--build` slices, on the `--held-out` slice, next to their in-sample
  coverage (on the slices they were built from).

Answer tokens = the assistant tokens of the regenerated conversations (the target's own answers, temperature 0.2),
tokenized with SmolLM2's chat template as for training. No model runs: only the tokenizer is loaded.
Writes benchmarks/results/<output-name>.{json,md}.

    python benchmarks/vocab_coverage.py
"""

import argparse
import sys
from collections import Counter

import _common as common
import datasets
from safetensors import safe_open

from dspark_hf.targets import load_target
from dspark_hf.training import frequent_token_ids, tokenize_conversations

DATA = common.ROOT / "benchmarks" / "data"
SHIPPED = common.ROOT / "src" / "dspark_hf" / "default_draft"


def answer_counts(dataset) -> Counter:
    """Assistant-token counts of a tokenized dataset."""
    counts: Counter = Counter()
    for example in dataset:
        counts.update(t for t, counted in zip(example["input_ids"], example["loss_mask"], strict=True) if counted)
    return counts


def coverage(counts: Counter, token_ids) -> float:
    """Share of the counted tokens that are in `token_ids`."""
    chosen = set(token_ids)
    return sum(n for t, n in counts.items() if t in chosen) / sum(counts.values())


def shipped_vocabulary() -> list[int]:
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        return f.get_tensor("draft_vocab_ids").tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", nargs="+", default=["smollm2_train6000_9000", "smollm2_train9000_12000",
                                                       "smollm2_train12000_15000"],
                        help="Slices of benchmarks/data/ the vocabularies are built from.")
    parser.add_argument("--held-out", default="smollm2_train15000_18862", help="The slice they are measured on.")
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192, 16384, 24576])
    parser.add_argument("--output-name", default="vocab_coverage")
    args = parser.parse_args(argv)
    env = common.setup(argparse.Namespace(threads=None, seed=0))
    report = common.start_report("vocab_coverage", __file__, argv, args, env)
    _, tokenizer = load_target("smollm2")
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    tokenized = {
        name: tokenize_conversations(DATA / f"{name}.responses.jsonl", tokenizer, max_length=2048)
        for name in [*args.build, args.held_out]
    }
    slices = {name: answer_counts(dataset) for name, dataset in tokenized.items()}
    built = datasets.concatenate_datasets([tokenized[name] for name in args.build])
    held_out = slices[args.held_out]
    shipped = shipped_vocabulary()
    report["vocabulary_size"] = len(tokenizer)
    report["answer_tokens"] = {name: sum(c.values()) for name, c in slices.items()}
    report["shipped"] = {"size": len(shipped), "coverage": {name: coverage(c, shipped) for name, c in slices.items()}}
    rows = []
    for size in args.sizes:
        ids, in_sample = frequent_token_ids(built, size, always_include=eos)
        rows.append({"size": size, "in_sample": in_sample, "held_out": coverage(held_out, ids)})
    report["built"] = rows
    common.write_results(args.output_name, report, markdown)
    return 0


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header("Draft vocabulary coverage out of sample (SmolLM2-135M-Instruct answers)", report,
                                 dtypes="tokenizer only")
    tokens = report["answer_tokens"]
    lines += [
        "Answer tokens per slice of `benchmarks/data/`: "
        + ", ".join(f"{name} {n:,}" for name, n in tokens.items()) + ".",
        "",
        f"## The shipped vocabulary ({report['shipped']['size']:,} tokens, built from the answers to prompts 0–6000)",
        "",
        "| slice (never seen by the vocabulary) | coverage | missed |",
        "|---|---:|---:|",
    ]
    for name, value in report["shipped"]["coverage"].items():
        lines.append(f"| {name} | {value:.2%} | {1 - value:.2%} |")
    lines += [
        "",
        f"## Vocabularies built from {', '.join(settings['build'])}, measured on {settings['held_out']}",
        "",
        "| size | in sample (built-from slices) | held out | missed, held out |",
        "|---:|---:|---:|---:|",
    ]
    for row in report["built"]:
        lines.append(f"| {row['size']:,} | {row['in_sample']:.2%} | {row['held_out']:.2%} | {1 - row['held_out']:.2%} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
