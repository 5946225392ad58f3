"""Restrict the built-in SmolLM2 draft to a draft vocabulary and compare draft-pass time and greedy output.

    python examples/draft_vocabulary.py                          # answers regenerated for 16 training prompts
    python examples/draft_vocabulary.py --data runs/data/train   # a dataset from `dspark-hf prepare-data`

The vocabulary is the most frequent tokens of the target's own answers (`frequent_token_ids`). Decoding stays
lossless: in float32 (used here) greedy output equals plain `generate` with and without the vocabulary.
"""

import argparse
import tempfile

import torch

import dspark_hf  # noqa: F401  (installs the generate() hook)
from dspark_hf.cli import load_target
from dspark_hf.demo import load_default_draft
from dspark_hf.engine import profile_draft_cost
from dspark_hf.training import build_training_dataset, frequent_token_ids, load_prompts, load_training_dataset


def answers_dataset(target, tokenizer, args):
    if args.data:
        return load_training_dataset(args.data)
    prompts = load_prompts(args.prompts, limit=args.num_prompts, shuffle=True, seed=0)
    folder = tempfile.mkdtemp(prefix="dspark_answers_")
    return build_training_dataset(target, tokenizer, prompts, f"{folder}/data", max_new_tokens=128, batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Tokenized answers (prepare-data output); default: regenerate a few.")
    parser.add_argument("--prompts", default="../shared/data/train/train_prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--size", type=int, default=8192, help="Tokens in the draft vocabulary.")
    parser.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    args = parser.parse_args()

    target, tokenizer = load_target("smollm2", dtype="float32")
    draft, source = load_default_draft(target, tokenizer)
    token_ids, coverage = frequent_token_ids(
        answers_dataset(target, tokenizer, args), args.size, always_include=[tokenizer.eos_token_id]
    )
    print(f"{source}: draft vocabulary of {len(token_ids)} tokens covers {coverage:.1%} of the answer tokens")

    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    settings = dict(max_new_tokens=96, do_sample=False, attention_mask=torch.ones_like(input_ids),
                    pad_token_id=tokenizer.eos_token_id)
    plain = target.generate(input_ids, **settings)
    for name, vocabulary in (("whole vocabulary", None), (f"{len(token_ids)} tokens", token_ids)):
        draft.set_draft_vocabulary(vocabulary)
        _, seconds = profile_draft_cost(draft, num_requests=(1,), repeats=7)
        same = torch.equal(target.generate(input_ids, assistant_model=draft, **settings), plain)
        print(f"{name:>16}: draft pass {seconds[0] * 1e3:.1f} ms, τ {draft.last_generate_stats.tau:.2f}, "
              f"greedy output identical to plain generate: {same}")


if __name__ == "__main__":
    main()
