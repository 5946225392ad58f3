"""Generate with a DSpark draft through `target.generate(assistant_model=draft)` and compare with plain decoding.

`--stream` also shows the hook-free form: `target.generate(ids, custom_generate=speculative_decoding, draft=draft,
token_streamer=TextStreamer(tokenizer))`, transformers' public entry for a custom decoding loop.

    python examples/generate.py                                  # SmolLM2 target, fresh draft
    python examples/generate.py --draft outputs/draft --sample   # a saved draft, sampling
    python examples/generate.py --draft src/dspark_hf/default_draft --prompt-lookup-tokens 10  # with prompt lookup
    python examples/generate.py --target Qwen/Qwen3-0.6B --device cuda             # any causal LM, on a GPU
    python examples/generate.py --stream                         # print tokens as they are accepted
    python examples/generate.py --eagle3                         # a fresh EAGLE-3 draft (or --draft an EAGLE-3 folder)
    python examples/generate.py --dtype bfloat16                 # default: the faster of bf16 and fp32 on this CPU
"""

import argparse

from transformers import TextStreamer

import dspark_hf  # noqa: F401  (routes generate(assistant_model=DSparkDraftModel) to DSpark's decoding loop)
from dspark_hf import DSparkDraftModel, Eagle3DraftModel, StaticThresholdPolicy, speculative_decoding
from dspark_hf.demo import greedy_verdict
from dspark_hf.evaluation import timed_generate
from dspark_hf.targets import chat_input_ids, fastest_cpu_dtype, load_target
from dspark_hf.training import draft_type_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:1 or auto; the draft follows the target.")
    parser.add_argument("--draft", help="A saved DSpark or EAGLE-3 draft (either layout); default: a fresh draft.")
    parser.add_argument("--eagle3", action="store_true", help="A fresh EAGLE-3 draft instead of a fresh DSpark one.")
    parser.add_argument("--dtype", help="Target and draft dtype (default: the faster of bfloat16 and float32 here).")
    parser.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="Sample (temperature 0.7) instead of greedy decoding.")
    parser.add_argument("--threshold", type=float, help="Verify only up to the first confidence below this value.")
    parser.add_argument(
        "--prompt-lookup-tokens", type=int, help="Verify prompt-lookup continuations of this length when there is one."
    )
    parser.add_argument("--stream", action="store_true", help="Stream the speculative answer (custom_generate form).")
    args = parser.parse_args()

    dtype = args.dtype or (fastest_cpu_dtype() if args.device in (None, "cpu") else "bfloat16")
    target, tokenizer = load_target(args.target, dtype=dtype, device=args.device)
    if args.draft:
        draft_class = Eagle3DraftModel if draft_type_of(args.draft) == "eagle3" else DSparkDraftModel
        draft = draft_class.from_pretrained(args.draft, target_model=target, dtype=target.dtype)
    elif args.eagle3:
        draft = Eagle3DraftModel.from_target(target, ttt_length=4).to(target.dtype)
    else:
        draft = DSparkDraftModel.from_target(target, tokenizer=tokenizer, block_size=8)
    policy = None if args.threshold is None else StaticThresholdPolicy(args.threshold)

    input_ids = chat_input_ids(tokenizer, args.prompt, target.device)
    settings = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    settings.update(do_sample=True, temperature=0.7) if args.sample else settings.update(do_sample=False)

    plain, plain_s = timed_generate(target, input_ids, **settings)
    if args.stream:  # transformers' public custom-loop entry: no hook involved
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        speculation = dict(custom_generate=speculative_decoding, draft=draft, token_streamer=streamer)
    else:
        speculation = dict(assistant_model=draft)
    speculation["verification_policy"] = policy
    output, speculative_s = timed_generate(
        target, input_ids, prompt_lookup_num_tokens=args.prompt_lookup_tokens, return_dict_in_generate=True,
        **speculation, **settings,
    )

    speculative, stats = output.sequences, output.speculation_stats
    print(tokenizer.decode(speculative[0, input_ids.shape[1]:], skip_special_tokens=True))
    if not args.sample:
        print(f"\nidentical to plain greedy decoding: {greedy_verdict(target, plain, speculative)[2]}")
    print(f"rounds {stats.num_rounds} ({sum(stats.looked_up)} looked up), τ {stats.tau:.2f}, "
          f"conditional acceptance {stats.conditional_acceptance()}")
    print(f"plain {plain_s:.2f}s, DSpark {speculative_s:.2f}s (draft {stats.draft_time_s:.2f}s, "
          f"verify {stats.verify_time_s:.2f}s)")


if __name__ == "__main__":
    main()
