"""Where greedy DSpark output in bf16 first differs from plain greedy `generate`, are the two tokens tied?

For the first turn of the first `--limit` prompts of each dataset, runs `generate(assistant_model=draft)` and plain
`generate` greedily with the target in bf16. At the first differing position it runs the target once over plain
decoding's prefix and reports the logits of the two tokens there (`dspark_hf.evaluation.first_divergence`). Equal
or nearly equal logits mean a tie, which the rounding of each pass breaks its own way. Writes
benchmarks/results/<name>.{json,md}.

    python benchmarks/greedy_ties.py --draft src/dspark_hf/default_draft --limit 2 --threads 2
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from dspark_hf import DSparkDraftModel
from dspark_hf.evaluation import first_divergence, load_prompt_sets
from dspark_hf.targets import load_target

RESULTS = Path(__file__).parent / "results"


def compare_greedy(target, tokenizer, draft, prompt: str, max_new_tokens: int) -> dict:
    """Greedy DSpark vs plain decoding of one prompt; the target's logits at their first differing token."""
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        dspark = target.generate(input_ids, assistant_model=draft, **settings)
        plain = target.generate(input_ids, **settings)
    divergence = first_divergence(target, plain, dspark)
    row = {"new_tokens": plain.shape[1] - input_ids.shape[1], "identical": divergence is None}
    if divergence is not None:
        row.update(asdict(divergence), first_difference=divergence.position - input_ids.shape[1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="src/dspark_hf/default_draft")
    parser.add_argument("--eval-dir", default="../shared/data/eval")
    parser.add_argument("--datasets", nargs="*", default=["gsm8k", "math500", "humaneval", "mbpp", "mt-bench",
                                                          "alpacaeval"])
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-name", default="greedy_ties")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    target, tokenizer = load_target("smollm2", dtype="bfloat16")
    draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval()
    rows = []
    for dataset, conversations in load_prompt_sets(args.eval_dir, args.datasets, args.limit).items():
        for index, turns in enumerate(conversations):
            row = {"dataset": dataset, "prompt": index, **compare_greedy(target, tokenizer, draft, turns[0],
                                                                           args.max_new_tokens)}
            rows.append(row)
            print(json.dumps(row))

    differing = [r for r in rows if not r["identical"]]
    equal = [r for r in differing if r["other_logit"] == r["plain_logit"]]
    tied = [r for r in differing if r["is_tie"]]
    report = {"benchmark": "greedy_ties", "settings": vars(args), "rows": rows, "turns": len(rows),
              "differing": len(differing), "equal_logits": len(equal), "ties": len(tied)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output_name}.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Greedy DSpark vs plain `generate` in bf16: the first differing token",
        "",
        f"Command: `python benchmarks/greedy_ties.py --draft {args.draft} --limit {args.limit} "
        f"--max-new-tokens {args.max_new_tokens} --threads {args.threads}`. SmolLM2-135M-Instruct target in bf16, "
        "first turn of each prompt, greedy. Logits: one target pass over plain decoding's prefix, at the first "
        "position where the two outputs differ; \"tie\": the logits differ by at most 2·eps·max|logit| of bf16.",
        "",
        "| dataset | prompt | new tokens | first difference at | plain token (logit) | DSpark token (logit) "
        "| tie |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["identical"]:
            lines.append(f"| {r['dataset']} | {r['prompt']} | {r['new_tokens']} | identical | – | – | – |")
        else:
            lines.append(
                f"| {r['dataset']} | {r['prompt']} | {r['new_tokens']} | {r['first_difference']} | "
                f"{r['plain_token']} ({r['plain_logit']:.3f}) | {r['other_token']} ({r['other_logit']:.3f}) | "
                f"{'yes' if r['is_tie'] else 'NO'} |"
            )
    lines += ["", f"{len(differing)} of {len(rows)} turns differ. At the first difference the two tokens' bf16 logits "
              f"are exactly equal in {len(equal)} of them and within rounding (at most 2·eps·max|logit|, "
              f"`dspark_hf.evaluation.first_divergence`) in {len(tied)}: ties that the rounding of each pass breaks "
              "its own way.", ""]
    (RESULTS / f"{args.output_name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
