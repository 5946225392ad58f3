"""Paper Fig. 2: per-position acceptance of every drafter, from tau_table.py's saved counts (no decoding).

For each drafter and decoding mode, the per-position counts of the chosen datasets are summed (every verification
round weighs the same) and turned into

- the conditional acceptance P(accept k | positions 1..k−1 accepted), the curve of the paper's Fig. 2, which shows
  how fast a parallel drafter's later positions decay and how much the sequential head lifts them;
- the unconditional prefix survival P(positions 1..k all accepted), whose sum over k plus one is τ.

Writes benchmarks/results/<output-name>.{json,md,png} (default acceptance_curves). Full run (after tau_table.py):

    python benchmarks/acceptance_curves.py --from benchmarks/results/tau_table.json \
        --datasets gsm8k math500 humaneval mbpp mt-bench alpacaeval --output-name acceptance_curves
"""

import json
from pathlib import Path

import _common as common


def parse_args(argv: list[str] | None):
    parser = common.base_parser(__doc__, "acceptance_curves")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=common.RESULTS / "tau_table.json",
        help="tau_table.py's JSON.",
    )
    parser.set_defaults(datasets=None)
    parser.description += "\n--drafts and --datasets select among those of the tau_table run (default: all)."
    return parser.parse_args(argv)


def curves(source: dict, names: list[str], datasets: list[str] | None) -> dict:
    result = {}
    for name in names:
        for mode, entry in source["results"][name].items():
            rows = [s for s in entry["datasets"] if datasets is None or s["dataset"] in datasets]
            if not rows:
                continue
            counts = common.merge_counts([s["position_counts"] for s in rows])
            result.setdefault(name, {})[mode] = {
                "datasets": [s["dataset"] for s in rows],
                "counts": counts,
                **common.acceptance_curves(counts),
            }
    return result


def markdown(report: dict) -> str:
    lines = common.report_header("Fig. 2 — per-position acceptance by drafter", report)
    lines += [
        f"From `{report['source']}` (command: `{report['source_command']}`); no decoding repeated. Counts of "
        "the selected datasets are summed, so every verification round weighs the same.",
        "",
    ]
    for mode in report["modes"]:
        for key, title in (
            ("conditional", "conditional acceptance P(accept k | accepted k−1)"),
            ("survival", "prefix survival P(accept 1..k)"),
        ):
            entries = {name: modes[mode] for name, modes in report["curves"].items() if mode in modes}
            size = max((len(e[key]) for e in entries.values()), default=0)
            lines += [
                f"## {mode}: {title}",
                "",
                f"| draft | rounds | {' | '.join(f'k={k + 1}' for k in range(size))} |",
                "|---|---|" + "---|" * size,
            ]
            for name, entry in entries.items():
                values = [common.fmt(v) for v in entry[key]] + ["–"] * (size - len(entry[key]))
                lines.append(f"| {name} | {entry['counts']['rounds']} | {' | '.join(values)} |")
            lines.append("")
    return "\n".join(lines)


def plot(report: dict):
    modes = report["modes"]
    fig, axes = common.figure(len(modes), 2, (11.0, 3.6 * len(modes)))
    for row, mode in zip(axes, modes, strict=True):
        for ax, key, label in (
            (row[0], "conditional", "P(accept k | accepted k−1)"),
            (row[1], "survival", "P(accept 1..k)"),
        ):
            for name, entry in report["curves"].items():
                if mode in entry:
                    points = [(k + 1, v) for k, v in enumerate(entry[mode][key]) if v is not None]
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=name)
            size = max(len(e[mode][key]) for e in report["curves"].values() if mode in e)
            ax.set_xticks(range(1, size + 1))
            ax.set_xlim(0.5, size + 0.5)
            ax.set_xlabel("draft position k")
            ax.set_ylabel(label)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{mode}: {key}")
            ax.grid(alpha=0.3)
        row[0].legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"{args.source} not found: run benchmarks/tau_table.py first.")
    source = json.loads(args.source.read_text(encoding="utf-8"))
    names = [name for name, _ in args.drafts] or list(source["results"])
    unknown = sorted(set(names) - set(source["results"]))
    if unknown:
        raise SystemExit(f"Drafts {unknown} are not in {args.source}; it has {sorted(source['results'])}.")
    env = common.setup(args)
    report = common.start_report("acceptance_curves", __file__, argv, args, env)
    report.update(
        source=str(args.source),
        source_command=source["command"],
        drafts={name: source["drafts"][name] for name in names},
        curves=curves(source, names, args.datasets),
    )
    report["modes"] = [
        m for m in source["settings"]["modes"] if any(m in e for e in report["curves"].values())
    ]
    common.write_results(args.output_name, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
