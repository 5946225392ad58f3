"""The built-in SmolLM2 draft with and without its draft vocabulary: draft-pass time, τ and greedy output.

    python examples/draft_vocabulary.py                                      # the vocabulary it ships with
    python examples/draft_vocabulary.py --data runs/data/train --size 4096   # one built from your answers

A draft vocabulary is the most frequent tokens of the target's own answers (`frequent_token_ids` on a dataset from
`dspark-hf prepare-data`). Decoding stays lossless: in float32 (used here) greedy output equals plain `generate`
with and without it.
"""

import argparse

import torch

from dspark_hf import chat_input_ids, load_target, profile_draft_cost
from dspark_hf.default_draft import load_default_draft
from dspark_hf.training import frequent_token_ids, load_training_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Tokenized answers (prepare-data output) to build the vocabulary from.")
    parser.add_argument("--size", type=int, default=8192, help="Tokens in a vocabulary built from --data.")
    parser.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    args = parser.parse_args()

    target, tokenizer = load_target("smollm2", dtype="float32")
    draft, source = load_default_draft(target, tokenizer)
    if args.data:
        token_ids, coverage = frequent_token_ids(
            load_training_dataset(args.data), args.size, always_include=[tokenizer.eos_token_id]
        )
        print(f"A draft vocabulary of {len(token_ids)} tokens covers {coverage:.1%} of the answer tokens in {args.data}")
    elif draft.draft_vocab_ids is not None:
        token_ids = draft.draft_vocab_ids.tolist()
        print(f"{source} ships a draft vocabulary of {len(token_ids)} tokens")
    else:
        raise SystemExit(f"{source} has no draft vocabulary; pass --data (a dataset from dspark-hf prepare-data).")

    input_ids = chat_input_ids(tokenizer, args.prompt)
    settings = dict(max_new_tokens=96, do_sample=False, attention_mask=torch.ones_like(input_ids),
                    pad_token_id=tokenizer.eos_token_id)
    plain = target.generate(input_ids, **settings)
    for name, vocabulary in (("whole vocabulary", None), (f"{len(token_ids)} tokens", token_ids)):
        draft.set_draft_vocabulary(vocabulary)
        _, seconds = profile_draft_cost(draft, num_requests=(1,), repeats=7)
        out = target.generate(input_ids, assistant_model=draft, return_dict_in_generate=True, **settings)
        same = torch.equal(out.sequences, plain)
        print(f"{name:>16}: draft pass {seconds[0] * 1e3:.1f} ms, τ {out.speculation_stats.tau:.2f}, "
              f"greedy output identical to plain generate: {same}")


if __name__ == "__main__":
    main()
