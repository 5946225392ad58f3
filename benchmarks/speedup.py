"""Wall-clock speed-up at batch 1: generate(assistant_model=draft) vs plain generate vs prompt lookup.

For every draft and decoding mode (greedy, and sampling at temperature 1.0), the evaluation harness runs each turn of
each prompt three ways in the same loop, so all three see the same machine load: with the draft, plain
`target.generate`, and transformers' prompt-lookup decoding (`prompt_lookup_num_tokens`). Speeds are generated
tokens per second (each method over its own tokens), pooled per dataset, per domain (math / code / chat) and over
everything. Targets (stated for greedy decoding; sampled rows are checked against the same numbers for reference):
speed-up over plain ≥ 2.0× on math and code, ≥ 1.5× on chat, and faster than prompt lookup on every domain.

Writes benchmarks/results/<output-name>.{json,md,png} (default speedup). Full run:

    python benchmarks/speedup.py --drafts dspark_g8=runs/train/dspark_g8 dflash_g8=runs/train/dflash_g8 \
        --eval-dir ../shared/data/eval --datasets gsm8k math500 humaneval mbpp mt-bench alpacaeval \
        --limit 20 --max-new-tokens 256 --threads 2 --modes greedy sampled --prompt-lookup-tokens 10 \
        --output-name speedup
"""

import _common as common

from dspark_hf.evaluation import domain_summaries, markdown_table
from dspark_hf.speculative import DEFAULT_LOOKUP_MIN_PROBABILITY, LOOKUP_MODES

PLAIN_TARGETS = {"math": 2.0, "code": 2.0, "chat": 1.5}


def runs(target, tokenizer, drafts: dict, prompts: dict, args):
    """Yields `(name, mode, summaries)` for every draft, then with --draft-lookup-tokens every draft as `<name>+lookup`
    (with --lookup-only, those alone), named `<name>+lookup@P` for each of several --lookup-min-probability values
    and `<name>+<lookup mode>` for each --lookup-modes value other than round."""
    variants = [] if args.lookup_only else [(name, draft, None, {}) for name, draft in drafts.items()]
    if args.draft_lookup_tokens:
        thresholds = args.lookup_min_probability
        for name, draft in drafts.items():
            for lookup_mode in args.lookup_modes:
                for p in thresholds if lookup_mode == "round" else thresholds[:1]:  # only round mode has the gate
                    label = f"{name}+lookup" if lookup_mode == "round" else f"{name}+{lookup_mode}"
                    label += f"@{p:g}" if len(thresholds) > 1 and lookup_mode == "round" else ""
                    kwargs = {"lookup_min_probability": p, "lookup_mode": lookup_mode}
                    variants.append((label, draft, args.draft_lookup_tokens, kwargs))
    baselines = {"compare_plain": True, "prompt_lookup_num_tokens": args.prompt_lookup_tokens}
    for name, draft, draft_lookup_tokens, draft_kwargs in variants:
        for mode in args.modes:
            yield name, mode, common.run_harness(
                target, tokenizer, draft, prompts, args, label=name, mode=mode,
                draft_prompt_lookup_num_tokens=draft_lookup_tokens, draft_generate_kwargs=draft_kwargs, **baselines,
            )


def measure(target, tokenizer, drafts: dict, prompts: dict, args) -> dict:
    results = {}
    for name, mode, summaries in runs(target, tokenizer, drafts, prompts, args):
        domains = domain_summaries(summaries)
        for domain in domains:
            plain_target = PLAIN_TARGETS.get(domain["domain"])
            domain["plain_target"] = plain_target
            domain["plain_target_met"] = (
                None if plain_target is None else domain["speedup_vs_plain"] >= plain_target
            )
            domain["prompt_lookup_target_met"] = domain["speedup_vs_prompt_lookup"] > 1.0
        results.setdefault(name, {})[mode] = {
            "datasets": summaries,
            "domains": domains,
            "overall": common.pooled_summary(summaries),
        }
    return results


def missed_targets(report: dict) -> list[str]:
    missed = []
    for name, modes in report["results"].items():
        for mode, result in modes.items():
            for d in result["domains"]:
                if d["plain_target_met"] is False:
                    missed.append(
                        f"{name}, {mode}, {d['domain']}: {d['speedup_vs_plain']:.2f}× plain generate "
                        f"(target ≥ {d['plain_target']}×)"
                    )
                if not d["prompt_lookup_target_met"]:
                    missed.append(
                        f"{name}, {mode}, {d['domain']}: {d['speedup_vs_prompt_lookup']:.2f}× prompt lookup "
                        "(target > 1×)"
                    )
    return missed


def looked_up_summary(datasets: list[dict]) -> list[str]:
    """A line on the rounds that verified a looked-up continuation (none: no line)."""
    accepted = [
        a
        for d in datasets
        for a, looked_up in zip(d["rounds_detail"]["accepted"], d["rounds_detail"].get("looked_up", []), strict=False)
        if looked_up
    ]
    if not accepted:
        return []
    rounds = sum(d["rounds"] for d in datasets)
    return [
        f"Rounds that verified a looked-up continuation: {len(accepted)} of {rounds}. They accepted "
        f"{sum(accepted) / len(accepted):.2f} looked-up tokens on average, none in "
        f"{sum(a == 0 for a in accepted) / len(accepted):.0%} of them.",
        "",
    ]


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header("Speed-up at batch 1 — DSpark vs plain generate vs prompt lookup", report)
    lines += [
        f"First {settings['limit']} prompts of each dataset (every turn), max_new_tokens="
        f"{settings['max_new_tokens']}, prompt lookup with {settings['prompt_lookup_tokens']} tokens, seed "
        f"{settings['seed']}. The three methods run back to back on every turn; each speed is the method's own "
        "generated tokens over its own time. Targets: × plain ≥ 2.0 (math, code), ≥ 1.5 (chat); × prompt "
        "lookup > 1 on every domain (stated for greedy; sampled rows checked against the same numbers).",
        "`greedy identical` compares every turn token for token with plain `generate`. In bf16 the target's "
        "multi-token verification pass rounds differently from its one-token decoding steps, so near-tied logits "
        "can resolve differently and a long answer may then drift; in float32 the outputs are identical "
        "(tests/test_generation.py, tests/test_smollm2.py). `greedy agreement` is the share of plain decoding's "
        "tokens each method reproduces before its first differing token, for DSpark and for transformers' own "
        "prompt-lookup decoding, which verifies several tokens per pass in the same way.",
        "",
    ]
    if settings.get("draft_lookup_tokens"):
        lines += [
            f"`<draft>+lookup` runs the same draft with `prompt_lookup_num_tokens={settings['draft_lookup_tokens']}` "
            "in its own `generate()` call: a round verifies transformers' prompt-lookup continuation when it follows "
            "a 2-gram match, or a 1-token match whose next token the draft gives at least `lookup_min_probability` "
            f"({', '.join(f'{p:g}' for p in settings.get('lookup_min_probability', [0.0]))}; `@P` names the value when there "
            "are several, 0 looks up every match), and the drafted block otherwise. Its τ counts both kinds of round.",
            "`<draft>+seed` (`lookup_mode=\"seed\"`) seeds the drafted block instead: when the lookup finds a "
            "continuation, its first token is the block's first proposal and the sequential head drafts the rest from "
            "it. `<draft>+hybrid` verifies a 2-gram match's continuation as a whole and seeds with a 1-token match "
            "(its `lookup_min_probability` plays no part).",
            "",
        ]
    for name, modes in report["results"].items():
        for mode, result in modes.items():
            lines += [
                f"## {name} — {mode}",
                "",
                *looked_up_summary(result["datasets"]),
                markdown_table(result["datasets"]),
                "| domain | τ | DSpark tok/s | plain tok/s | prompt lookup tok/s | × plain | target | "
                "× prompt lookup | target |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for d in [*result["domains"], {**result["overall"], "plain_target": None}]:
                plain_check = (
                    "–"
                    if d["plain_target"] is None
                    else (f"≥ {d['plain_target']}: {common.verdict(d['plain_target_met'])}")
                )
                lookup_check = (
                    "–" if d["domain"] == "all" else f"> 1: {common.verdict(d['prompt_lookup_target_met'])}"
                )
                lines.append(
                    f"| {d['domain']} | {common.fmt(d['tau'])} | {common.fmt(d['dspark_tokens_per_s'], 1)} | "
                    f"{common.fmt(d.get('plain_tokens_per_s'), 1)} | "
                    f"{common.fmt(d.get('prompt_lookup_tokens_per_s'), 1)} | "
                    f"{common.fmt(d.get('speedup_vs_plain'))}× | {plain_check} | "
                    f"{common.fmt(d.get('speedup_vs_prompt_lookup'))}× | {lookup_check} |"
                )
            lines.append("")
    lines += common.draft_cost_lines(report)
    missed = missed_targets(report)
    lines += ["## Targets", ""]
    lines += [f"**Target missed**: {m}." for m in missed] or ["Every domain meets its targets."]
    return "\n".join(lines) + "\n"


def plot(report: dict):
    modes = report["settings"]["modes"]
    fig, axes = common.figure(1, len(modes), (6.5 * len(modes), 4.2))
    names = list(report["results"])
    for ax, mode in zip(axes[0], modes, strict=True):
        first = report["results"][names[0]][mode]
        domains = [d["domain"] for d in first["domains"]] + ["all"]
        bars = {
            f"{name} × plain": [
                d["speedup_vs_plain"]
                for d in [*report["results"][name][mode]["domains"], report["results"][name][mode]["overall"]]
            ]
            for name in names
        }
        bars[f"prompt lookup × plain ({names[0]} run)"] = [
            d["prompt_lookup_tokens_per_s"] / d["plain_tokens_per_s"]
            for d in [*first["domains"], first["overall"]]
        ]
        width = 0.8 / len(bars)
        for i, (label, values) in enumerate(bars.items()):
            ax.bar(
                [j + (i - (len(bars) - 1) / 2) * width for j in range(len(domains))],
                values,
                width,
                label=label,
            )
        for j, domain in enumerate(domains):
            if domain in PLAIN_TARGETS:
                ax.hlines(
                    PLAIN_TARGETS[domain],
                    j - 0.45,
                    j + 0.45,
                    colors="red",
                    linestyles="--",
                    label="target × plain" if j == 0 else None,
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_ylabel("speed-up over plain generate")
        ax.set_title(f"batch 1, {mode}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = common.decoding_parser(__doc__, "speedup")
    parser.add_argument(
        "--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens of the baseline."
    )
    parser.add_argument(
        "--draft-lookup-tokens",
        type=int,
        help="Also run every draft with prompt_lookup_num_tokens=N in its own generate() (reported as <name>+lookup).",
    )
    parser.add_argument(
        "--lookup-only", action="store_true", help="With --draft-lookup-tokens, skip the drafts run alone."
    )
    parser.add_argument(
        "--lookup-min-probability",
        type=float,
        nargs="+",
        default=[DEFAULT_LOOKUP_MIN_PROBABILITY],
        help="With --draft-lookup-tokens: generate's lookup_min_probability, the draft probability a 1-token lookup "
        "match needs to be verified (0: every match, as transformers' prompt lookup). Several values: one variant each.",
    )
    parser.add_argument(
        "--lookup-modes",
        nargs="+",
        choices=LOOKUP_MODES,
        default=["round"],
        help="With --draft-lookup-tokens: generate's lookup_mode, one variant each (round: verify a looked-up "
        "continuation or the drafted block; seed: a looked-up token starts the drafted block; hybrid: both by match).",
    )
    prepared = common.prepare(parser, __file__, argv)
    if prepared is None:
        return 0
    args, target, tokenizer, drafts, report = prepared
    if args.lookup_only and not args.draft_lookup_tokens:
        parser.error("--lookup-only runs the <draft>+lookup variants only: give --draft-lookup-tokens N too.")
    report["results"] = measure(target, tokenizer, drafts, common.load_prompts(args), args)
    common.write_results(args.output_name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
