"""Block-size sweep: τ and tokens/s against the number of drafted tokens verified per round.

For every draft (block size γ) and every k in {1, 2, 4, …, γ} (or --lengths), the draft still drafts its whole block
but only the first k drafted tokens are sent to the target each round, by a fixed-length verification policy passed as
generate's `verification_policy` (defined here through the public `dspark_hf.scheduling.VerificationPolicy` interface;
lossless, since k is fixed before drafting). k = γ is the plain full-block run, and that run also times plain
`generate` for the speed-up column. Drafts of different γ can be given side by side. With --from, each row also shows
the τ predicted from tau_table.py's full-block counts, 1 + Σ_{j≤k} P(accept 1..j), per dataset and macro-averaged.

The generate() path only applies a verification policy to drafts with a confidence head; drafts without one are
reported as not cappable (the library has no other cap on the number of verified tokens).

Writes benchmarks/results/<output-name>.{json,md,png} (default block_size_sweep). Full run:

    python benchmarks/block_size_sweep.py --drafts dspark_g8=runs/train/dspark_g8 dflash_g8=runs/train/dflash_g8 \
        --eval-dir ../shared/data/eval --datasets gsm8k math500 humaneval mbpp mt-bench alpacaeval \
        --limit 10 --max-new-tokens 256 --threads 2 --modes greedy \
        --from benchmarks/results/tau_table.json --output-name block_size_sweep
"""

import json
from pathlib import Path

import _common as common

from dspark_hf.scheduling import VerificationPolicy


class FixedLengthPolicy(VerificationPolicy):
    """Verifies the first `length` drafted tokens (fewer only where the room left is smaller). Lossless."""

    def __init__(self, length: int):
        self.length = length

    def _select(self, confidences, caps, request_ids):
        return [min(self.length, cap) for cap in caps]


def lengths_for(block_size: int, requested: list[int] | None) -> list[int]:
    """{1, 2, 4, …} below γ (or the requested lengths that fit in the block), and always γ itself (whose run also
    times the plain baseline)."""
    if requested:
        return sorted({k for k in requested if 1 <= k < block_size} | {block_size})
    return sorted({2**i for i in range(block_size.bit_length()) if 2**i < block_size} | {block_size})


def predicted_tau(source: dict | None, name: str, mode: str, datasets: list[str], k: int) -> float | None:
    """Macro τ expected at verification length k from the full-block rounds of a tau_table run."""
    entry = (source or {}).get("results", {}).get(name, {}).get(mode)
    if entry is None:
        return None
    taus = []
    for summary in entry["datasets"]:
        if summary["dataset"] in datasets:
            survival = common.acceptance_curves(summary["position_counts"])["survival"][:k]
            taus.append(1 + sum(v or 0.0 for v in survival))
    return common.macro_average(taus)


def sweep(
    target, tokenizer, drafts: dict, prompts: dict, args, source: dict | None
) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for name, draft in drafts.items():
        gamma = draft.config.block_size
        if draft.confidence_head is None:
            notes.append(
                f"{name}: no confidence head, so generate() accepts no verification policy and the verified "
                "length cannot be capped through the public API; only k = γ was run."
            )
        for mode in args.modes:
            for k in lengths_for(gamma, args.lengths):
                if k < gamma and draft.confidence_head is None:
                    continue
                summaries = common.run_harness(
                    target,
                    tokenizer,
                    draft,
                    prompts,
                    args,
                    label=f"{name}-k{k}",
                    mode=mode,
                    compare_plain=k == gamma,
                    draft_generate_kwargs={"verification_policy": None if k == gamma else FixedLengthPolicy(k)},
                )
                pooled = common.pooled_summary(summaries)
                rows.append(
                    {
                        "draft": name,
                        "block_size": gamma,
                        "k": k,
                        "mode": mode,
                        "macro_tau": common.macro_average(s["tau"] for s in summaries),
                        "pooled_tau": pooled["tau"],
                        "predicted_tau": predicted_tau(source, name, mode, list(prompts), k),
                        "tokens_per_s": pooled["dspark_tokens_per_s"],
                        "plain_tokens_per_s": pooled.get("plain_tokens_per_s"),
                        "datasets": summaries,
                    }
                )
    for row in rows:  # speed-up over the plain generate timed in the same draft's full-block run
        plain = next(
            r["plain_tokens_per_s"]
            for r in rows
            if (r["draft"], r["mode"], r["k"]) == (row["draft"], row["mode"], row["block_size"])
        )
        row["speedup_vs_plain"] = row["tokens_per_s"] / plain if plain else None
    return rows, notes


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header("Block-size sweep — τ and tokens/s vs verified draft length k", report)
    lines += [
        f"First {settings['limit']} prompts of each of {', '.join(settings['datasets'])} (every turn), "
        f"max_new_tokens={settings['max_new_tokens']}, seed {settings['seed']}. Each round the draft drafts its "
        "whole block of γ and the first k tokens are verified (fixed-length policy defined in this script). "
        "τ is macro-averaged over datasets; tokens/s pools all tokens; × plain is against plain `generate` "
        "timed in the same draft's k = γ run. Predicted τ = 1 + Σ_{j≤k} P(accept 1..j) from "
        f"{report['source'] or '(no --from given)'}.",
        "",
    ]
    lines += [
        "| draft | γ | mode | k | macro τ | predicted τ | tokens/s | × plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['draft']} | {r['block_size']} | {r['mode']} | {r['k']} | {common.fmt(r['macro_tau'])} | "
            f"{common.fmt(r['predicted_tau'])} | {common.fmt(r['tokens_per_s'], 1)} | "
            f"{common.fmt(r['speedup_vs_plain'])} |"
        )
    lines += ["", *[f"Note: {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def plot(report: dict):
    fig, axes = common.figure(1, 2, (11.0, 4.0))
    series = {}
    for row in report["rows"]:
        series.setdefault((row["draft"], row["mode"]), []).append(row)
    for (name, mode), rows in series.items():
        label = f"{name} ({mode})"
        ks = [r["k"] for r in rows]
        line = axes[0][0].plot(ks, [r["macro_tau"] for r in rows], marker="o", label=label)[0]
        predicted = [(r["k"], r["predicted_tau"]) for r in rows if r["predicted_tau"] is not None]
        if predicted:
            axes[0][0].plot(
                *zip(*predicted, strict=True),
                linestyle="--",
                color=line.get_color(),
                label=f"{label}, predicted",
            )
        axes[0][1].plot(
            ks, [r["tokens_per_s"] for r in rows], marker="o", color=line.get_color(), label=label
        )
        plain = [r["plain_tokens_per_s"] for r in rows if r["plain_tokens_per_s"]]
        if plain:
            axes[0][1].axhline(
                plain[0], linestyle=":", color=line.get_color(), label=f"plain generate ({mode})"
            )
    for ax, ylabel in zip(axes[0], ("macro τ", "tokens / s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("verified draft tokens per round k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("τ vs k")
    axes[0][1].set_title("speed vs k")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = common.decoding_parser(__doc__, "block_size_sweep", modes=("greedy",))
    parser.add_argument(
        "--lengths", type=int, nargs="+", help="Verified lengths k (default 1, 2, 4, …; γ is always run)."
    )
    parser.add_argument(
        "--from", dest="source", type=Path, help="tau_table.py's JSON, for the predicted τ column."
    )
    prepared = common.prepare(parser, __file__, argv)
    if prepared is None:
        return 0
    args, target, tokenizer, drafts, report = prepared
    source = json.loads(args.source.read_text(encoding="utf-8")) if args.source else None
    report["source"] = None if args.source is None else str(args.source)
    report["rows"], report["notes"] = sweep(
        target, tokenizer, drafts, common.load_prompts(args), args, source
    )
    common.write_results(args.output_name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
