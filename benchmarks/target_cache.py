"""What the offline target cache costs and saves: build time and disk size, and one training step with and without it.

Target SmolLM2-135M-Instruct in bf16; a fresh draft like `benchmarks/configs/train_dspark_g4.json` (γ = 4, 1 layer,
Markov rank 128); the first `--examples` conversations of the tokenized training data. The cache is built into a
temporary folder; then `--steps` training steps (`compute_dspark_loss` + backward, batch 2, 32 anchors) are timed
online (target forward every step) and from the cache, interleaved, same batches and anchors; medians are reported.
Writes benchmarks/results/target_cache.{json,md}.

    python benchmarks/target_cache.py --data runs/data/smollm2_train400 --examples 64 --steps 10 --threads 2
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common as common
import torch

from dspark_hf import DSparkDraftModel
from dspark_hf.targets import load_target
from dspark_hf.training import (
    DSparkDataCollator,
    TargetCacheDataset,
    build_target_cache,
    compute_dspark_loss,
    load_training_dataset,
)


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


def markdown(report: dict) -> str:
    settings, median = report["settings"], report["median_step_s"]
    tokens, build_s, size = report["tokens"], report["build_s"], report["bytes"]
    lines = common.report_header(
        "Offline target cache on SmolLM2-135M-Instruct (CPU)", report, "target in bfloat16, draft in float32"
    ) + [
        f"{settings['examples']} conversations ({tokens} tokens) of `{settings['data']}`; fresh γ=4 draft (1 layer, "
        "Markov rank 128).",
        "",
        "| what | measured |",
        "|---|---|",
        f"| cache build | {build_s:.1f} s ({tokens / build_s:.0f} tokens/s) |",
        f"| cache size | {size / 2**20:.1f} MiB ({size / tokens / 1024:.2f} KiB per token) |",
        f"| training step, online (median of {settings['steps']}) | {median['online']:.2f} s |",
        f"| training step, from the cache (median of {settings['steps']}) | {median['cached']:.2f} s |",
        f"| cached / online | {report['cached_over_online']:.2f} |",
        "",
        "A step = `compute_dspark_loss` (batch 2, 32 anchors) + backward; both modes use the same batches and anchors,",
        "interleaved in alternating order.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/data/smollm2_train400", help="Tokenized data (dspark-hf prepare-data).")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    env = common.setup(args)
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
    report = common.start_report("target_cache", __file__, argv, args, env)
    report.update(
        tokens=tokens,
        build_s=build_s,
        bytes=size,
        bytes_per_token=size / tokens,
        step_s=times,
        median_step_s={"online": online, "cached": from_cache},
        cached_over_online=from_cache / online,
    )
    common.write_results("target_cache", report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
