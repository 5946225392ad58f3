"""Report of draft training runs (DSpark, DFlash, EAGLE-3) on SmolLM2-135M-Instruct.

Reads each run's `trainer_state.json` (loss curves, logged metrics, runtime), computes training throughput, and
measures τ through `target.generate(assistant_model=draft)` on held-out prompts (the benchmark sets, which are
never trained on). Writes benchmarks/results/train_smollm2.{json,md,png}.

    dspark-hf prepare-data --config benchmarks/configs/prepare_smollm2_400.json
    dspark-hf train --config benchmarks/configs/train_dspark_g8.json     # and train_dflash_g8.json
    python benchmarks/train_smollm2_report.py --runs runs/train/dspark_g8 runs/train/dflash_g8 --limit 4
"""

import argparse
import json
from pathlib import Path

import _common as common
import datasets
import torch

from dspark_hf.evaluation import domain_summaries, evaluate, load_prompt_sets
from dspark_hf.targets import load_target

RESULTS = Path(__file__).parent / "results"
CURVES = ("loss", "ce", "tv", "expected_tau")


def trainer_state(run: Path) -> dict:
    """The newest trainer_state.json of a run (final one, else the latest checkpoint's)."""
    candidates = [run / "trainer_state.json", *sorted(run.glob("checkpoint-*/trainer_state.json"),
                                                     key=lambda p: int(p.parent.name.split("-")[1]))]
    existing = [p for p in candidates if p.exists()]
    if not existing:
        raise FileNotFoundError(f"No trainer_state.json under {run}.")
    final = run / "trainer_state.json"
    return json.loads((final if final.exists() else existing[-1]).read_text())


def latest_draft(run: Path) -> Path:
    if (run / "config.json").exists():
        return run
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise FileNotFoundError(f"No saved draft under {run}.")
    return checkpoints[-1]


def training_summary(run: Path, tokens_per_sample: float) -> dict:
    state = trainer_state(run)
    history = state["log_history"]
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    config_path = Path(__file__).parent / "configs" / f"train_{run.name}.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    runtime = next((h["train_runtime"] for h in history if "train_runtime" in h), None)
    if runtime is None and (run / "train_results.json").exists():  # written by `dspark-hf train`
        runtime = json.loads((run / "train_results.json").read_text())["train_runtime"]
    steps = state["global_step"]
    batch = config.get("per_device_train_batch_size", 1) * config.get("gradient_accumulation_steps", 1)
    return {
        "run": run.name,
        "config": config,
        "steps": steps,
        "curves": {key: [(h["step"], float(h[key])) for h in train_logs if key in h] for key in CURVES},
        "last_train_log": train_logs[-1] if train_logs else None,
        "last_eval": eval_logs[-1] if eval_logs else None,
        "eval_expected_tau": [(h["step"], h["eval_expected_tau"]) for h in eval_logs if "eval_expected_tau" in h],
        "train_runtime_s": runtime,
        "tokens_per_s": None if runtime is None else steps * batch * tokens_per_sample / runtime,
    }


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, key in zip(axes, CURVES, strict=True):
        for summary in summaries:
            points = summary["curves"][key]
            if points:
                ax.plot(*zip(*points, strict=True), label=summary["run"])
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--data", default="runs/data/smollm2_train400", help="The tokenized training data.")
    parser.add_argument("--prompts-dir", default="../shared/data/eval")
    parser.add_argument("--datasets", nargs="*", default=["gsm8k", "humaneval", "mt-bench"])
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--name", default="train_smollm2")
    args = parser.parse_args()

    data = datasets.load_from_disk(args.data)
    tokens_per_sample = sum(data["num_tokens"]) / len(data)
    target, tokenizer = load_target("smollm2", dtype="bfloat16")
    prompts = load_prompt_sets(args.prompts_dir, args.datasets, args.limit)
    report = []
    for run in args.runs:
        summary = training_summary(run, tokens_per_sample)
        draft_path = latest_draft(run)
        draft = common.load_draft(draft_path, target)
        info = common.draft_info(draft)
        torch.manual_seed(0)
        datasets_eval = evaluate(target, tokenizer, draft, prompts, max_new_tokens=args.max_new_tokens,
                                 compare_plain=False, prompt_lookup_num_tokens=None)
        summary.update(
            draft=str(draft_path),
            head=info["markov_head_type"],
            block_size=info["block_size"],
            layers=info["num_hidden_layers"],
            held_out=[{k: d[k] for k in ("dataset", "domain", "turns", "tau", "conditional_acceptance")}
                      for d in datasets_eval],
            held_out_domains=domain_summaries(datasets_eval),
        )
        report.append(summary)
        print(f"{run.name}: step {summary['steps']}, τ by dataset "
              f"{[(d['dataset'], round(d['tau'], 3)) for d in summary['held_out']]}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / f"{args.name}.png")
    lines = [
        f"# Draft training on SmolLM2-135M-Instruct ({args.data}, {len(data)} conversations, "
        f"{tokens_per_sample:.0f} tokens/sample)", "",
        "| run | starts from | head | γ | layers | steps | train minutes | train tokens/s | last loss | last expected τ (train) "
        "| expected τ (eval split) | held-out τ (greedy, generate) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report:
        last, last_eval = s["last_train_log"] or {}, s["last_eval"] or {}
        taus = ", ".join(f"{d['dataset']} {d['tau']:.2f}" for d in s["held_out"])
        tps = "–" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.0f}"
        minutes = "–" if s["train_runtime_s"] is None else f"{s['train_runtime_s'] / 60:.1f}"
        lines.append(
            f"| {s['run']} | {s['config'].get('draft', 'fresh')} | {s['head']} | {s['block_size']} | {s['layers']} | "
            f"{s['steps']} | {minutes} | {tps} | {float(last.get('loss', 'nan')):.3f} | "
            f"{float(last.get('expected_tau', 'nan')):.3f} | {float(last_eval.get('eval_expected_tau', 'nan')):.3f} | "
            f"{taus} |"
        )
    lines += ["", "Expected τ on the eval split by step: " + "; ".join(
        f"{s['run']} " + ", ".join(f"{step}: {tau:.3f}" for step, tau in s["eval_expected_tau"]) for s in report
    ) + "."]
    lines += ["", f"Held-out prompts: first {args.limit} of each of {', '.join(prompts)} (all turns), "
              f"greedy, max_new_tokens={args.max_new_tokens}, target and draft in bf16. \"starts from\": a run that "
              "continues a saved draft (`--draft`; with more `--num-draft-layers`, the new layers start as the "
              "identity) counts its own steps only.", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
