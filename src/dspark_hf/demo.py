"""SmolLM2-135M-Instruct with the built-in default draft against plain `generate` (`dspark-hf demo`)."""

import torch

from .default_draft import load_default_draft
from .evaluation import first_divergence, timed_generate

DEMO_PROMPTS = {
    "math": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Reason step by step.",
    "code": "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "chat": "Give me three tips for staying focused while studying.",
}


def greedy_verdict(target, plain: torch.Tensor, output: torch.Tensor) -> tuple[bool, bool, str]:
    """Compares a greedy output with plain decoding's: (identical, identical or a floating-point tie of the target,
    printable verdict naming the first differing token and the target's logits there)."""
    if torch.equal(plain, output):
        return True, True, "yes"
    divergence = first_divergence(target, plain, output)
    if divergence is None:  # one output stopped earlier, without a differing token
        where, tie = "one output is a prefix of the other", True
    else:
        where = (
            f"first differs at token {divergence.position}: target logits {divergence.plain_logit:.3f} vs "
            f"{divergence.other_logit:.3f}"
        )
        tie = divergence.is_tie
    return False, tie, f"no, {where} ({'a rounding tie' if tie else 'NOT a rounding tie'})"


def run_demo(max_new_tokens: int = 64, dtype: str = "fastest", prompt_lookup_tokens: int | None = 10) -> list[dict]:
    """Generates for one prompt per domain with and without the draft (and, with `prompt_lookup_tokens`, with the
    draft and prompt lookup together); prints and returns the measurements. Raises `RuntimeError` when an output
    differs from plain greedy decoding by more than a rounding tie of the target. `dtype="fastest"` picks bfloat16
    on CPUs with bf16 instructions and float32 elsewhere ([`fastest_cpu_dtype`])."""
    from .targets import chat_input_ids, fastest_cpu_dtype, load_target

    if dtype == "fastest":
        dtype = fastest_cpu_dtype()
    target, tokenizer = load_target("smollm2", dtype=dtype)
    draft, description = load_default_draft(target, tokenizer)
    print(f"target: SmolLM2-135M-Instruct ({target.dtype}); draft: {description}\n")
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    timed_generate(target, tokenizer("warm up", return_tensors="pt").input_ids, max_new_tokens=4)
    speculative_kwargs = {"assistant_model": draft, "return_dict_in_generate": True, **kwargs}
    results = []
    for domain, prompt in DEMO_PROMPTS.items():
        input_ids = chat_input_ids(tokenizer, prompt)
        plain, plain_s = timed_generate(target, input_ids, **kwargs)
        output, speculative_s = timed_generate(target, input_ids, **speculative_kwargs)
        speculative, stats = output.sequences, output.speculation_stats
        identical, tie, verdict = greedy_verdict(target, plain, speculative)
        new_tokens = speculative.shape[1] - input_ids.shape[1]
        acceptance = ", ".join("-" if a is None else f"{a:.2f}" for a in stats.conditional_acceptance())
        print(f"[{domain}] {prompt}\n  answer: {tokenizer.decode(speculative[0, input_ids.shape[1]:], skip_special_tokens=True)!r}")
        print(
            f"  identical to plain generate: {verdict}\n  τ = {stats.tau:.2f} | per-position acceptance: {acceptance}\n"
            f"  plain {(plain.shape[1] - input_ids.shape[1]) / plain_s:.1f} tok/s, DSpark {new_tokens / speculative_s:.1f} "
            f"tok/s, speed-up ×{plain_s / speculative_s:.2f}"
        )
        result = {"domain": domain, "identical": identical, "tie": tie, "tau": stats.tau,
                  "speedup": plain_s / speculative_s}
        if prompt_lookup_tokens:
            output, both_s = timed_generate(
                target, input_ids, prompt_lookup_num_tokens=prompt_lookup_tokens, **speculative_kwargs
            )
            both, both_stats = output.sequences, output.speculation_stats
            both_identical, both_tie, both_verdict = greedy_verdict(target, plain, both)
            print(
                f"  DSpark + prompt lookup ({prompt_lookup_tokens} tokens): τ = {both_stats.tau:.2f}, "
                f"{sum(both_stats.looked_up)} of {both_stats.num_rounds} rounds looked up, "
                f"{(both.shape[1] - input_ids.shape[1]) / both_s:.1f} tok/s, speed-up ×{plain_s / both_s:.2f}, "
                f"identical to plain generate: {both_verdict}"
            )
            result.update(lookup_identical=both_identical, lookup_tie=both_tie, lookup_tau=both_stats.tau,
                          lookup_speedup=plain_s / both_s)
        print()
        results.append(result)
    comparisons = [(r["identical"], r["tie"]) for r in results]
    comparisons += [(r["lookup_identical"], r["lookup_tie"]) for r in results if "lookup_tie" in r]
    if not all(identical or tie for identical, tie in comparisons):
        raise RuntimeError("DSpark output differed from plain generate beyond rounding: this is a bug, please report it.")
    if not all(identical for identical, _ in comparisons):
        print(f"Note: in {target.dtype} the target's multi-token verification pass rounds differently from its one-token "
              "steps, so logits tied within rounding can resolve differently; float32 (--dtype float32) rounds 65,000× "
              "finer and matched plain decoding in every test.")
    return results

