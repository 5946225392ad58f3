"""Peak memory and step rate of `dspark-hf train` with the reference configs, from the target cache and online.

Each configuration runs as its own process (`dspark-hf train --config C --max-steps N`, no evaluation, no
checkpoint) so that its peak resident memory (VmHWM of /proc/self/status, Linux) is its own; the step rate is the
trainer's `train_steps_per_second` (model loading excluded). Writes benchmarks/results/train_memory.{json,md}.

    python benchmarks/train_memory.py --steps 20 --threads 2
    python benchmarks/train_memory.py --steps 40 --threads 2 --output-name train_vocab_speed \
        --configs train_dspark_g4_2k.json train_dspark_g4_5k.json   # whole vocabulary vs draft vocabulary
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as common

ROOT = common.ROOT
CONFIGS = ROOT / "benchmarks" / "configs"
# (config, from the target cache?)
RUNS = (
    ("train_dspark_g4.json", True),
    ("train_dspark_g4.json", False),
    ("train_dflash_g4.json", True),
    ("train_dspark_rnn_g4.json", True),
    ("train_dspark_g8.json", True),
)
PEAK_MARKER = "PEAK_RSS_KIB"
# Runs the CLI and reports the process's peak resident set size on exit.
WRAPPER = f"""
import atexit, sys
from dspark_hf.cli import main

def report_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("{PEAK_MARKER}", line.split()[1], file=sys.stderr)

atexit.register(report_peak)
sys.exit(main(sys.argv[1:]))
"""


def run(config: str, cached: bool, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-c", WRAPPER, "train", "--config", str(CONFIGS / config), "--max-steps", str(steps),
            "--output-dir", out, "--eval-strategy", "no", "--save-steps", str(10 * steps), "--logging-steps",
            str(steps), "--threads", str(threads),
        ]
        if not cached:
            command += ["--target-cache", ""]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[3:])} failed:\n{done.stderr[-3000:]}")
        peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith(PEAK_MARKER)]
        results = json.loads((Path(out) / "train_results.json").read_text())
    config_data = json.loads((CONFIGS / config).read_text())
    return {
        "config": config,
        "target_cache": cached,
        "block_size": config_data["block_size"],
        "markov_head_type": config_data["markov_head_type"],
        "num_anchors": config_data["num_anchors"],
        "batch_size": config_data["per_device_train_batch_size"],
        "draft_vocab_size": config_data.get("draft_vocab_size"),
        "steps": steps,
        "peak_rss_mib": peaks[-1] / 1024,
        "steps_per_second": results["train_steps_per_second"],
    }


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header(
        "Training memory and step rate on SmolLM2-135M-Instruct (CPU)",
        report,
        "target in bfloat16, draft in float32 with AdamW",
    ) + [
        f"Each row is one `dspark-hf train` process ({settings['steps']} steps, {settings['threads']} torch threads); "
        "peak RSS = VmHWM of the process, target and data included.",
        "",
        "| config | γ | head | anchors × batch | vocabulary | target | peak RSS (MiB) | steps/s |",
        "|---|---:|---|---|---:|---|---:|---:|",
    ]
    for row in report["runs"]:
        vocabulary = row.get("draft_vocab_size") or "whole"
        lines.append(
            f"| {row['config']} | {row['block_size']} | {row['markov_head_type']} | {row['num_anchors']} × "
            f"{row['batch_size']} | {vocabulary} | {'cached' if row['target_cache'] else 'online'} | "
            f"{row['peak_rss_mib']:.0f} | {row['steps_per_second']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--configs", nargs="+", help="Configs under benchmarks/configs, each from its target cache (default: the "
        "reference set, plus train_dspark_g4.json online)."
    )
    parser.add_argument("--output-name", default="train_memory")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        print("Skipping: peak memory is read from /proc (Linux only).", file=sys.stderr)
        return 0
    report = common.start_report(args.output_name, __file__, argv, args, common.setup(args))
    report["runs"] = []
    for config, cached in RUNS if args.configs is None else [(config, True) for config in args.configs]:
        report["runs"].append(run(config, cached, args.steps, args.threads))
        print(report["runs"][-1], file=sys.stderr)
    common.write_results(args.output_name, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
