"""Merges regenerated-response files into one training set, one conversation per prompt id.

Used for the 5k SmolLM2 training set: the three `prepare-data` slices overlap, and the prompts that
calibrate the shipped draft are left out so that they stay held out:

    python benchmarks/merge_conversations.py \
        --inputs runs/data/smollm2_train2k.responses.jsonl runs/data/smollm2_train3000.responses.jsonl \
                 runs/data/smollm2_train3000_6000.responses.jsonl \
        --exclude-calibration 400 --output runs/data/smollm2_train5k.responses.jsonl
"""

import argparse
import json
from pathlib import Path

from dspark_hf.training import load_prompts

TRAIN_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared/data/train/train_prompts.jsonl"


def calibration_prompt_ids(count: int, calibration_exclude: str) -> set[str]:
    """Ids of the prompts `dspark-hf calibrate --shuffle --seed 1 --limit count --exclude calibration_exclude` draws."""
    prompts = load_prompts(TRAIN_PROMPTS, shuffle=True, seed=1, limit=count, exclude=calibration_exclude)
    return {p["id"] for p in prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="`.responses.jsonl` files, earliest first.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--exclude-calibration", type=int, default=0, help="Leave out this many calibration prompts.")
    parser.add_argument(
        "--calibration-exclude",
        help="The `--exclude` source of that calibration (default: the first input, as for the drafts before 2026-11-30).",
    )
    args = parser.parse_args()
    calibration_exclude = args.calibration_exclude or args.inputs[0]
    excluded = calibration_prompt_ids(args.exclude_calibration, calibration_exclude) if args.exclude_calibration else set()
    kept: dict[str, str] = {}
    for path in args.inputs:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if row["id"] not in excluded:
                kept.setdefault(row["id"], line)
    Path(args.output).write_text("".join(line + "\n" for line in kept.values()))
    print(f"{len(kept)} conversations ({len(excluded)} calibration prompt ids excluded) -> {args.output}")


if __name__ == "__main__":
    main()
