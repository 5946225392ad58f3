"""Serve several chats at once with the batched DSpark engine, streaming their text as rounds produce it.

    python examples/engine.py                                          # SmolLM2, fresh draft, full-block verification
    python examples/engine.py --draft outputs/draft --cost-table cost.json   # trained draft, Algorithm 1
    python examples/engine.py --sample                                 # sampling (temperature 0.7, top-p 0.9)

Make a cost table in the engine's shapes, with the draft pass time, with
`dspark-hf profile --target smollm2 --shape RxW --batch-sizes 1 2 3 4 5 --draft outputs/draft --out cost.json`.
"""

import argparse

from dspark_hf import CostTable, DSparkDraftModel, DSparkEngine, SamplingParams
from dspark_hf.targets import chat_input_ids, load_target

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips in total?",
    "Write a Python function that reverses a linked list.",
    "Give me three tips for a good night's sleep.",
    "What is the capital of Australia? Answer in one sentence.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", help="A saved draft (either layout); default: a fresh draft for SmolLM2.")
    parser.add_argument("--cost-table", help="SPS(B) table: enables the load-aware scheduler (Algorithm 1).")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sample", action="store_true")
    args = parser.parse_args()

    target, tokenizer = load_target("smollm2", dtype="bfloat16")
    if args.draft:
        draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype)
    else:
        draft = DSparkDraftModel.from_target(target, tokenizer=tokenizer, block_size=8)
    cost_table = CostTable.load(args.cost_table) if args.cost_table else None
    engine = DSparkEngine(target, draft.eval(), cost_table=cost_table, tokenizer=tokenizer)  # prefix if a table
    print(f"policy: {type(engine.policy).__name__}")

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=0.7, top_p=0.9,
        stop_token_ids=[tokenizer.eos_token_id],
    )

    def stream(request, token_ids, text):
        if text:
            print(f"[{request.request_id}] +{len(token_ids)} tokens: {text!r}")

    for prompt in PROMPTS:
        engine.add_request(chat_input_ids(tokenizer, prompt), params, callback=stream)
    finished = []
    while engine.has_unfinished():
        finished += engine.step()

    for request in sorted(finished, key=lambda r: r.request_id):
        print(f"\n[{request.request_id}] {request.finish_reason}, τ = {request.stats.tau:.2f}, "
              f"{request.tokens_per_second:.1f} tok/s\n{request.text}")
    stats = engine.stats
    print(f"\n{stats.rounds} rounds, {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
          f"mean verification budget {stats.mean_verification_budget:.2f}, τ {stats.tau:.2f}")


if __name__ == "__main__":
    main()
