"""What the offline target cache costs and saves: build time and disk size, and one training step with and without it.

Target SmolLM2-135M-Instruct in bf16; a fresh draft like `benchmarks/configs/train_dspark_g4.json` (γ = 4, 1 layer,
Markov rank 128); the first `--examples` conversations of the tokenized training data. The cache is built into a
temporary folder; then `--steps` training steps (`compute_dspark_loss` + backward, batch 2, 32 anchors) are timed
online (target forward every step) and from the cache, interleaved, same batches and anchors; medians are reported.
Writes benchmarks/results/target_cache.{json,md}.

    python benchmarks/target_cache.py --data runs/data/smollm2_train400 --examples 64 --steps 10 --threads 2
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dspark_hf import DSparkDraftModel
from dspark_hf.cli import load_target
from dspark_hf.training import (
    DSparkDataCollator,
    TargetCacheDataset,
    build_target_cache,
    compute_dspark_loss,
    load_training_dataset,
)

RESULTS = Path(__file__).parent / "results"


def timed_step(draft, target, batch, seed: int, cached: bool) -> float:
    draft.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss, _, _ = compute_dspark_loss(
        draft,
        target,
        batch["input_ids"],
        batch["loss_mask"],
        batch["attention_mask"],
        num_anchors=32,
        generator=torch.Generator().manual_seed(seed),
        target_features=batch.get("target_features") if cached else None,
        target_final_hidden=batch.get("target_final_hidden") if cached else None,
    )
    loss.loss.backward()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/data/smollm2_train400", help="Tokenized data (dspark-hf prepare-data).")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target("smollm2", dtype="bfloat16")
    dataset = load_training_dataset(args.data, tokenizer).select(range(args.examples))
    torch.manual_seed(0)
    draft = DSparkDraftModel.from_target(target, tokenizer=tokenizer, block_size=4, num_hidden_layers=1, markov_rank=128)
    draft.float()
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        build_target_cache(target, dataset, draft.config.target_layer_ids, cache_dir, batch_size=4, progress=False)
        build_s = time.perf_counter() - started
        size = sum(f.stat().st_size for f in Path(cache_dir).iterdir())
        cached = TargetCacheDataset(dataset, cache_dir, draft.config.target_layer_ids)
        collator = DSparkDataCollator(tokenizer=tokenizer)
        times = {"online": [], "cached": []}
        for step in range(args.steps + 1):  # step 0 warms up
            batch = collator([cached[(2 * step + i) % len(cached)] for i in range(2)])
            order = ("online", "cached") if step % 2 == 0 else ("cached", "online")
            for mode in order:
                elapsed = timed_step(draft, target, batch, step, cached=mode == "cached")
                if step:
                    times[mode].append(elapsed)
    online, from_cache = (statistics.median(times[m]) for m in ("online", "cached"))
    report = {
        "command": "python benchmarks/target_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "examples": args.examples,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "build_s": build_s,
        "bytes": size,
        "bytes_per_token": size / tokens,
        "step_s": times,
        "median_step_s": {"online": online, "cached": from_cache},
        "cached_over_online": from_cache / online,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "target_cache.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Offline target cache on SmolLM2-135M-Instruct (CPU)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{args.examples} conversations ({tokens} tokens) of `{args.data}`; target bf16; fresh γ=4 draft (1 layer, "
        f"Markov rank 128); {report['threads']} torch threads on {report['cpu_count']} cores.",
        "",
        "| what | measured |",
        "|---|---|",
        f"| cache build | {build_s:.1f} s ({tokens / build_s:.0f} tokens/s) |",
        f"| cache size | {size / 2**20:.1f} MiB ({size / tokens / 1024:.2f} KiB per token) |",
        f"| training step, online (median of {args.steps}) | {online:.2f} s |",
        f"| training step, from the cache (median of {args.steps}) | {from_cache:.2f} s |",
        f"| cached / online | {from_cache / online:.2f} |",
        "",
        "A step = `compute_dspark_loss` (batch 2, 32 anchors) + backward; both modes use the same batches and anchors,",
        "interleaved in alternating order.",
    ]
    (RESULTS / "target_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
