"""Sequential-head overhead: per-round latency of DSpark drafting with and without the sequential head.

A round of `generate(assistant_model=draft)` is one draft proposal (backbone over anchor + γ−1 masks, then left-to-
right sampling through the sequential head, the confidence head scoring each position) followed by one target
verification pass over the anchor and γ drafted tokens. On real SmolLM2 contexts (a prompt of each dataset plus
--max-new-tokens tokens of the target's own greedy answer) this script times, interleaved in a rotating order:

- the proposal step with the head: `DSparkProposer.propose`, exactly the code generate() runs;
- the same step without it: the same weights loaded into a twin with markov_head_type "none" (its confidence head
  then reads the backbone state only, as a DFlash draft's does);
- the target's verification forward over γ+1 tokens on the cached context, asking for the draft's feature layers.

Per (draft, mode) it reports median times and overhead = (t_with − t_without) / (t_with + t_verify), the head's
share of a round, against the target ≤ 3%. Latency does not depend on the weights, so without --drafts it times a
fresh draft (`DSparkDraftModel.from_target(target, block_size=8, num_hidden_layers=1, markov_rank=128)`).

Writes benchmarks/results/<output-name>.{json,md,png} (default head_overhead). Full run:

    python benchmarks/head_overhead.py --drafts dspark_g8=runs/train/dspark_g8 \
        --eval-dir ../shared/data/eval --datasets gsm8k math500 humaneval mbpp mt-bench alpacaeval \
        --limit 2 --max-new-tokens 128 --repeats 50 --threads 2 --modes greedy sampled --output-name head_overhead
"""

import copy
import statistics
import sys
import time

import _common as common
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import LogitsProcessorList

from dspark_hf import DSparkDraftModel, DSparkProposer
from dspark_hf.models.dspark import target_hidden_state_indices

OVERHEAD_TARGET = 0.03
PARTS = ("with_head", "without_head", "verify")


def without_head(draft: DSparkDraftModel, target) -> DSparkDraftModel:
    """The same draft with markov_head_type "none": every weight that still fits is copied over."""
    config = copy.deepcopy(draft.config)
    config.markov_head_type = "none"
    twin = DSparkDraftModel(config).to(dtype=draft.dtype, device=draft.device)
    own = twin.state_dict()
    twin.load_state_dict(
        {k: v for k, v in draft.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False
    )
    return twin.attach(target).eval()


def fresh_drafts(target, tokenizer, args) -> dict:
    return {
        f"fresh-{head}-g{args.fresh_block_size}": DSparkDraftModel.from_target(
            target,
            tokenizer=tokenizer,
            block_size=args.fresh_block_size,
            num_hidden_layers=args.fresh_layers,
            markov_rank=args.fresh_rank,
            markov_head_type=head,
        ).eval()
        for head in args.fresh_head_types
    }


def build_contexts(target, tokenizer, prompts: dict, max_new_tokens: int) -> dict:
    """`{dataset: [ids (1, L)]}`: each prompt's first turn, chat-templated, plus the target's greedy answer."""
    contexts = {}
    for name, conversations in prompts.items():
        for turns in conversations:
            input_ids = common.chat_input_ids(tokenizer, turns[0], target.device)
            output = target.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
            contexts.setdefault(name, []).append(output)
    return contexts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_context(target, pair: dict, context: torch.Tensor, mode: str, args) -> dict:
    """Interleaved timings (seconds) of one round's three parts on one context."""
    gamma = pair["with_head"].config.block_size
    config = copy.deepcopy(target.generation_config)
    config.update(
        do_sample=mode == "sampled", max_length=context.shape[1] + 4 * gamma, output_hidden_states=False
    )
    cache = DynamicCache(config=target.config)
    prefill = target(input_ids=context[:, :-1], cache=cache, use_cache=True, output_hidden_states=True)
    proposers = {
        variant: DSparkProposer(draft, config, LogitsProcessorList())
        for variant, draft in pair.items()
    }
    for proposer in proposers.values():  # the draft's context: every token but the anchor
        proposer.observe(prefill.hidden_states, context.shape[1] - 1)
    block = proposers["with_head"].propose(context, budget=gamma).block
    verify_ids = torch.cat([context[:, -1:], block.tokens], dim=-1)
    layers = target_hidden_state_indices(pair["with_head"].config.target_layer_ids)

    def verify():
        target(input_ids=verify_ids, cache=cache, use_cache=True, output_hidden_states=layers)
        cache.crop(-verify_ids.shape[1])

    calls = {
        "with_head": lambda: proposers["with_head"].propose(context, budget=gamma),
        "without_head": lambda: proposers["without_head"].propose(context, budget=gamma),
        "verify": verify,
    }
    times = {part: [] for part in PARTS}
    for repeat in range(args.warmup + args.repeats):
        shift = repeat % len(PARTS)  # rotating order: a slow phase of a shared machine hits every part alike
        for part in PARTS[shift:] + PARTS[:shift]:
            synchronize(context.device)
            started = time.perf_counter()
            calls[part]()
            synchronize(context.device)
            if repeat >= args.warmup:
                times[part].append(time.perf_counter() - started)
    return times


def summarize(times: dict) -> dict:
    """Median milliseconds of each part, and the head's share of a round."""
    ms = {part: 1000 * statistics.median(values) for part, values in times.items()}
    head = ms["with_head"] - ms["without_head"]
    round_ms = ms["with_head"] + ms["verify"]
    return {
        **{f"{part}_ms": value for part, value in ms.items()},
        "head_ms": head,
        "round_ms": round_ms,
        "round_without_head_ms": ms["without_head"] + ms["verify"],
        "overhead": head / round_ms,
        "samples": len(times["verify"]),
    }


def measure(target, drafts: dict, contexts: dict, args) -> tuple[list[dict], list[str]]:
    results, notes = [], []
    for name, draft in drafts.items():
        if draft.markov_head is None:
            notes.append(f'{name} has no sequential head (markov_head_type "none"): nothing to measure.')
            continue
        pair = {"with_head": draft, "without_head": without_head(draft, target)}
        for mode in args.modes:
            pooled, per_context = {part: [] for part in PARTS}, []
            for dataset, items in contexts.items():
                started = time.perf_counter()
                for context in items:
                    torch.manual_seed(args.seed)
                    with torch.no_grad():
                        times = time_context(target, pair, context, mode, args)
                    per_context.append(
                        {"dataset": dataset, "context_tokens": context.shape[1], **summarize(times)}
                    )
                    for part in PARTS:
                        pooled[part] += times[part]
                last = per_context[-len(items) :]
                print(
                    f"[{name} | {mode}] {dataset}: {len(items)} contexts, draft "
                    f"{statistics.median(r['with_head_ms'] for r in last):.2f} / "
                    f"{statistics.median(r['without_head_ms'] for r in last):.2f} ms with / without head, verify "
                    f"{statistics.median(r['verify_ms'] for r in last):.1f} ms, overhead "
                    f"{100 * statistics.median(r['overhead'] for r in last):.2f}%, "
                    f"{time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            overall, overheads = summarize(pooled), [r["overhead"] for r in per_context]
            results.append(
                {
                    "draft": name,
                    "mode": mode,
                    "block_size": draft.config.block_size,
                    **overall,
                    "overhead_min": min(overheads),
                    "overhead_max": max(overheads),
                    "met": overall["overhead"] <= OVERHEAD_TARGET,
                    "contexts": per_context,
                }
            )
    return results, notes


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header(
        "Sequential-head overhead — per-round latency with vs without the head", report
    )
    lines += [
        f"Contexts: the first {settings['limit']} prompts of each of {', '.join(settings['datasets'])} (first "
        f"turn) plus {settings['max_new_tokens']} tokens of the target's greedy answer "
        f"({report['context_tokens']['min']}–{report['context_tokens']['max']} tokens). Per context "
        f"{settings['warmup']} untimed and {settings['repeats']} timed repetitions of the three parts, in a "
        "rotating order; medians over all timed samples of all contexts. Draft = "
        "`DSparkProposer.propose` (backbone + head sampling + confidence head); without head = "
        'the same weights with markov_head_type "none"; verify = target forward over γ+1 tokens. '
        "Overhead = (draft with − draft without) / (draft with + verify).",
        "",
        "| draft | mode | γ | draft with head (ms) | draft without head (ms) | head (ms) | verify γ+1 (ms) | "
        "round (ms) | overhead | per-context range | target ≤ 3% |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['draft']} | {r['mode']} | {r['block_size']} | {r['with_head_ms']:.2f} | "
            f"{r['without_head_ms']:.2f} | {r['head_ms']:.2f} | {r['verify_ms']:.1f} | {r['round_ms']:.1f} | "
            f"{100 * r['overhead']:.2f}% | {100 * r['overhead_min']:.1f}–{100 * r['overhead_max']:.1f}% | "
            f"{common.verdict(r['met'])} |"
        )
    lines.append("")
    for r in report["results"]:
        if not r["met"]:
            lines.append(
                f"**Target missed**: the head of {r['draft']} ({r['mode']}) costs {100 * r['overhead']:.2f}% "
                f"of a round, above the ≤ {100 * OVERHEAD_TARGET:.0f}% target."
            )
    if report["results"] and all(r["met"] for r in report["results"]):
        lines.append(f"The head stays within the ≤ {100 * OVERHEAD_TARGET:.0f}% target in every row.")
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict):
    fig, axes = common.figure(1, 2, (12.0, 4.2))
    ax = axes[0][0]
    labels, bottoms = [], []
    for i, r in enumerate(report["results"]):
        label = f"{r['draft']}\n{r['mode']}"
        for j, (variant, draft_ms) in enumerate(
            (("without head", r["without_head_ms"]), ("with head", r["with_head_ms"]))
        ):
            x = 2.5 * i + j
            ax.bar(
                x,
                draft_ms,
                color="tab:blue" if j == 0 else "tab:orange",
                label=("draft without head", "draft with head")[j] if i == 0 else None,
            )
            ax.bar(
                x,
                r["verify_ms"],
                bottom=draft_ms,
                color="tab:gray",
                label="verify γ+1" if i == j == 0 else None,
            )
            labels.append(f"{label}\n{variant}")
            bottoms.append(x)
    ax.set_xticks(bottoms, labels, fontsize=7)
    ax.set_ylabel("median ms per round")
    ax.set_title("round = draft proposal + target verification")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for r in report["results"]:
        ax.scatter(
            [c["context_tokens"] for c in r["contexts"]],
            [100 * c["overhead"] for c in r["contexts"]],
            label=f"{r['draft']} ({r['mode']})",
            s=18,
        )
    ax.axhline(100 * OVERHEAD_TARGET, color="red", linestyle="--", label="target 3%")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("head overhead, % of round")
    ax.set_title("overhead per context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = common.decoding_parser(__doc__, "head_overhead")
    parser.set_defaults(limit=2, max_new_tokens=128)
    parser.add_argument("--repeats", type=int, default=50, help="Timed repetitions per context and part.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed repetitions per context and part.")
    parser.add_argument(
        "--fresh-head-types",
        nargs="+",
        choices=["markov", "gated", "rnn"],
        default=["markov"],
        help="Without --drafts: heads of the fresh drafts to time.",
    )
    parser.add_argument("--fresh-block-size", type=int, default=8)
    parser.add_argument("--fresh-layers", type=int, default=1)
    parser.add_argument("--fresh-rank", type=int, default=128)
    prepared = common.prepare(parser, __file__, argv, require_drafts=False)
    if prepared is None:
        return 0
    args, target, tokenizer, drafts, report = prepared
    if not drafts:
        drafts = fresh_drafts(target, tokenizer, args)
        report["drafts"] = {name: common.draft_info(draft) for name, draft in drafts.items()}
    with torch.no_grad():
        contexts = build_contexts(target, tokenizer, common.load_prompts(args), args.max_new_tokens)
    lengths = [c.shape[1] for items in contexts.values() for c in items]
    report["context_tokens"] = {
        "min": min(lengths),
        "max": max(lengths),
        "median": statistics.median(lengths),
    }
    report["results"], report["notes"] = measure(target, drafts, contexts, args)
    common.write_results(args.output_name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
