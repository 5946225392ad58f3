"""Paper Table 1: acceptance length τ per dataset and its macro-average, for every drafter, greedy and sampled.

τ is the mean number of tokens gained per target verification pass, the target's bonus/correction token included,
measured with `target.generate(assistant_model=draft)` through `dspark_hf.evaluation` (whole blocks verified; the
plain and prompt-lookup baselines are skipped here, see speedup.py). The macro-average is the unweighted mean over
datasets. When a DSpark draft (sequential head "markov"/"gated"/"rnn") and a DFlash draft (head "none") of the same γ are
given, the ratio of their macro τ is checked against the target ≥ 1.15× (every such pair, or only the
`--pairs DSPARK:DFLASH` given, e.g. drafts trained on the same data). Per-position acceptance counts of every
dataset are saved in the JSON for acceptance_curves.py and block_size_sweep.py.

Writes benchmarks/results/<output-name>.{json,md,png} (default tau_table). Full run:

    python benchmarks/tau_table.py --drafts dspark_g8=runs/train/dspark_g8 dflash_g8=runs/train/dflash_g8 \
        --eval-dir ../shared/data/eval --datasets gsm8k math500 humaneval mbpp mt-bench alpacaeval \
        --limit 20 --max-new-tokens 256 --threads 2 --modes greedy sampled --output-name tau_table
"""

import _common as common

RATIO_TARGET = 1.15


def measure(target, tokenizer, drafts: dict, prompts: dict, args) -> dict:
    results = {}
    runs = common.each_draft_and_mode(target, tokenizer, drafts, prompts, args, compare_plain=args.compare_plain)
    for name, mode, summaries in runs:
        pooled = common.pooled_summary(summaries)
        results.setdefault(name, {})[mode] = {
            "macro_tau": common.macro_average(s["tau"] for s in summaries),
            "pooled_tau": pooled["tau"],
            "pooled_tokens_per_s": pooled["dspark_tokens_per_s"],
            "pooled_plain_tokens_per_s": pooled.get("plain_tokens_per_s"),
            "speedup_vs_plain": pooled.get("speedup_vs_plain"),
            "position_counts": common.merge_counts([s["position_counts"] for s in summaries]),
            "datasets": summaries,
        }
    return results


def dspark_dflash_ratios(report: dict) -> list[dict]:
    """Macro τ of every DSpark draft over every DFlash draft of the same γ (or of the `pairs` setting), per mode."""
    drafts, rows = report["drafts"], []
    pairs = report["settings"].get("pairs")
    wanted = None if not pairs else {tuple(pair.split(":", 1)) for pair in pairs}
    for dspark, info in drafts.items():
        for dflash, other in drafts.items():
            if (
                info["kind"] != "DSpark"
                or other["kind"] != "DFlash"
                or info["block_size"] != other["block_size"]
                or (wanted is not None and (dspark, dflash) not in wanted)
            ):
                continue
            for mode in report["settings"]["modes"]:
                a, b = (
                    report["results"][dspark][mode]["macro_tau"],
                    report["results"][dflash][mode]["macro_tau"],
                )
                ratio = a / b if a and b else None
                rows.append(
                    {
                        "mode": mode,
                        "dspark": dspark,
                        "dflash": dflash,
                        "block_size": info["block_size"],
                        "dspark_macro_tau": a,
                        "dflash_macro_tau": b,
                        "ratio": ratio,
                        "target": RATIO_TARGET,
                        "met": None if ratio is None else ratio >= RATIO_TARGET,
                    }
                )
    return rows


def speed_lines(report: dict) -> list[str]:
    """Markdown table of each draft's speed against plain `generate()` run on the same turns in the same loop."""
    lines = [
        "## Speed against plain `generate()` (same turns, same loop, pooled over datasets)",
        "",
        "| draft | kind | mode | draft tok/s | plain tok/s | speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, info in report["drafts"].items():
        for mode in report["settings"]["modes"]:
            result = report["results"][name][mode]
            lines.append(
                f"| {name} | {info['kind']} | {mode} | {common.fmt(result['pooled_tokens_per_s'], 1)} | "
                f"{common.fmt(result['pooled_plain_tokens_per_s'], 1)} | "
                f"{common.fmt(result['speedup_vs_plain'], 2)}× |"
            )
    return lines + [""]


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header(
        "Table 1 — acceptance length τ by dataset (SmolLM2-135M-Instruct target)", report
    )
    lines += [
        f"First {settings['limit']} prompts of each dataset (every turn), max_new_tokens="
        f"{settings['max_new_tokens']}, whole blocks verified, seed {settings['seed']}. τ = tokens per target "
        "verification pass, bonus/correction token included; macro = unweighted mean over datasets; pooled = "
        "over all rounds.",
        "",
    ]
    datasets = settings["datasets"]
    for mode in settings["modes"]:
        title = "greedy" if mode == "greedy" else f"sampled, temperature {settings['temperature']}"
        lines += [
            f"## {title}",
            "",
            f"| draft | kind | γ | {' | '.join(datasets)} | macro τ | pooled τ |",
            "|---|---|---|" + "---|" * (len(datasets) + 2),
        ]
        for name, info in report["drafts"].items():
            result = report["results"][name][mode]
            taus = {s["dataset"]: s["tau"] for s in result["datasets"]}
            lines.append(
                f"| {name} | {info['kind']} | {info['block_size']} | "
                f"{' | '.join(common.fmt(taus.get(d)) for d in datasets)} | "
                f"**{common.fmt(result['macro_tau'])}** | {common.fmt(result['pooled_tau'])} |"
            )
        lines.append("")
    lines += common.draft_cost_lines(report)
    if settings.get("compare_plain"):
        lines += speed_lines(report)
    lines += [f"## DSpark / DFlash macro τ at the same γ (target ≥ {RATIO_TARGET}×)", ""]
    if report["ratios"]:
        lines += [
            "| mode | DSpark draft | DFlash draft | γ | DSpark macro τ | DFlash macro τ | ratio | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["ratios"]:
            lines.append(
                f"| {r['mode']} | {r['dspark']} | {r['dflash']} | {r['block_size']} | "
                f"{common.fmt(r['dspark_macro_tau'])} | {common.fmt(r['dflash_macro_tau'])} | "
                f"{common.fmt(r['ratio'], 3)}× | {common.verdict(r['met'])} |"
            )
        missed = [r for r in report["ratios"] if r["met"] is False]
        lines.append("")
        for r in missed:
            lines.append(
                f"**Target missed**: {r['dspark']} reaches {common.fmt(r['ratio'], 3)}× the macro τ of "
                f"{r['dflash']} ({r['mode']}, γ={r['block_size']}), below the ≥ {RATIO_TARGET}× target."
            )
        if not missed:
            lines.append(f"Every DSpark/DFlash pair meets the ≥ {RATIO_TARGET}× target.")
    else:
        lines.append("Not checked: no DSpark draft and DFlash draft with the same γ were given.")
    return "\n".join(lines) + "\n"


def plot(report: dict):
    modes, datasets = report["settings"]["modes"], [*report["settings"]["datasets"], "macro"]
    fig, axes = common.figure(1, len(modes), (max(6.0, 1.3 * len(datasets)) * len(modes), 4.0))
    names = list(report["drafts"])
    width = 0.8 / max(len(names), 1)
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, name in enumerate(names):
            result = report["results"][name][mode]
            taus = {s["dataset"]: s["tau"] for s in result["datasets"]} | {"macro": result["macro_tau"]}
            ax.bar(
                [j + (i - (len(names) - 1) / 2) * width for j in range(len(datasets))],
                [taus.get(d) or 0.0 for d in datasets],
                width,
                label=name,
            )
        ax.set_xticks(range(len(datasets)), datasets, rotation=30)
        ax.set_ylabel("τ (tokens per verification, bonus included)")
        ax.set_title(f"τ by dataset — {mode}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = common.decoding_parser(__doc__, "tau_table")
    parser.add_argument(
        "--pairs", nargs="+", metavar="DSPARK:DFLASH",
        help="DSpark/DFlash draft labels to compare (default: every pair of the same γ).",
    )
    parser.add_argument(
        "--compare-plain", action="store_true",
        help="Also run plain generate() on every turn in the same loop and report each draft's speed-up over it.",
    )
    prepared = common.prepare(parser, __file__, argv)
    if prepared is None:
        return 0
    args, target, tokenizer, drafts, report = prepared
    report["results"] = measure(target, tokenizer, drafts, common.load_prompts(args), args)
    report["ratios"] = dspark_dflash_ratios(report)
    common.write_results(args.output_name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
