"""Shared plumbing of the paper-style benchmarks (tau_table, acceptance_curves, block_size_sweep, head_overhead,
speedup): command-line arguments, loading the bf16 target and the saved drafts, running the evaluation harness one
dataset at a time with a progress line, per-position acceptance counts, and writing
benchmarks/results/<name>.{json,md,png}.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from dspark_hf import DSparkDraftModel, Eagle3DraftModel
from dspark_hf.evaluation import domain_summaries, evaluate, load_prompt_sets
from dspark_hf.targets import load_target
from dspark_hf.training import draft_type_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EVAL_DIR = ROOT.parent / "shared" / "data" / "eval"
DATASETS = ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench", "alpacaeval")
MODES = ("greedy", "sampled")
DTYPE = "bfloat16"


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def draft_spec(text: str) -> tuple[str, str]:
    """`name=path` (or a bare path, named after its folder) → `(name, path)`."""
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text).name, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--drafts takes name=path, got {text!r}.")
    return name, path


def base_parser(doc: str, output_name: str) -> argparse.ArgumentParser:
    """Arguments of every benchmark: --drafts, --datasets, --output-name."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--drafts",
        nargs="+",
        type=draft_spec,
        default=[],
        metavar="NAME=PATH",
        help="Saved drafts (DSparkDraftModel.from_pretrained folders), each named for the report.",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), help="Prompt sets (files of --eval-dir)."
    )
    parser.add_argument(
        "--output-name", default=output_name, help="Writes benchmarks/results/<name>.{json,md,png}."
    )
    return parser


def decoding_parser(doc: str, output_name: str, modes: tuple[str, ...] = MODES) -> argparse.ArgumentParser:
    """`base_parser` plus the arguments of scripts that decode: prompts, lengths, modes, threads, seed."""
    parser = base_parser(doc, output_name)
    parser.add_argument(
        "--eval-dir", type=Path, default=EVAL_DIR, help="Folder of <dataset>.jsonl prompt files."
    )
    parser.add_argument("--limit", type=int, default=20, help="Prompts (all their turns) per dataset.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(modes),
        help="greedy, and/or sampled (temperature --temperature, top-k/top-p off).",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="Temperature of the sampled mode.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch.manual_seed before every (draft, mode, dataset)."
    )
    parser.add_argument(
        "--target", default="smollm2", help="Target model (dspark_hf.targets.load_target name or path)."
    )
    parser.add_argument(
        "--dtype",
        default=DTYPE,
        choices=["bfloat16", "float32"],
        help="dtype of target and drafts (bfloat16: the project's benchmark setting; float32 for CPUs without "
        "bf16 instructions, where bf16 matmuls are several times slower).",
    )
    parser.add_argument(
        "--resume-dir",
        type=Path,
        help="Keep each finished (draft, mode, dataset) here and reuse it on a rerun (same settings).",
    )
    return parser


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran this benchmark, for the report."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", os.path.relpath(script, ROOT), *args])


def setup(args: argparse.Namespace) -> dict:
    """Applies --threads and --seed; returns a description of the machine for the report."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, "seed", 0))
    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_before": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def start_report(
    benchmark: str,
    script: str,
    argv: list[str] | None,
    args: argparse.Namespace,
    env: dict,
    drafts: dict | None = None,
) -> dict:
    """The common head of a benchmark's JSON: what ran, with which settings, on what, with which drafts."""
    settings = json.loads(json.dumps(vars(args), default=str))
    return {
        "benchmark": benchmark,
        "command": command_line(script, argv),
        "settings": settings,
        "environment": env,
        "drafts": {name: draft_info(draft) for name, draft in (drafts or {}).items()},
    }


def prepare(
    parser: argparse.ArgumentParser, script: str, argv: list[str] | None, require_drafts: bool = True
):
    """Parses the arguments of a decoding benchmark and loads what it needs.

    Returns `(args, target, tokenizer, drafts, report)` with `report` from `start_report`, or None when the
    prompt folder is absent (the benchmark then skips, as the project's data README asks).
    """
    args = parser.parse_args(argv)
    if require_drafts and not args.drafts:
        parser.error("--drafts name=path [name=path ...] is required.")
    if missing_eval_dir(args):
        return None
    env = setup(args)
    target, tokenizer, drafts = load_models(args)
    report = start_report(Path(script).stem, script, argv, args, env, drafts)
    return args, target, tokenizer, drafts, report


def missing_eval_dir(args: argparse.Namespace) -> bool:
    """True (after saying so) when the prompt folder is absent: the benchmark then skips."""
    if Path(args.eval_dir).is_dir():
        return False
    print(
        f"Skipping: the eval prompts are not in {args.eval_dir} (see ../shared/data/README.md).",
        file=sys.stderr,
    )
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Models and prompts
# ----------------------------------------------------------------------------------------------------------------------


def load_models(args: argparse.Namespace) -> tuple:
    """`(target, tokenizer, drafts)`: the target in --dtype (bf16 by default) and `{name: draft}` from --drafts
    (DSpark or EAGLE-3 drafts, either layout), in the same dtype, attached."""
    target, tokenizer = load_target(args.target, dtype=getattr(args, "dtype", DTYPE))
    drafts = {}
    for name, path in args.drafts:
        if name in drafts:
            raise SystemExit(f"Two drafts are named {name!r}; name them apart with --drafts name=path.")
        drafts[name] = load_draft(path, target)
    return target, tokenizer, drafts


def load_draft(path: str | Path, target) -> "DSparkDraftModel | Eagle3DraftModel":
    """A saved draft of either family (either layout), in the target's dtype, attached, in eval mode; its path is
    kept as `benchmark_path` for the reports."""
    draft_class = Eagle3DraftModel if draft_type_of(path) == "eagle3" else DSparkDraftModel
    draft = draft_class.from_pretrained(path, target_model=target, dtype=target.dtype).eval()
    draft.benchmark_path = str(path)
    return draft


def draft_info(draft: "DSparkDraftModel | Eagle3DraftModel") -> dict:
    """What the reports say about a draft (for EAGLE-3: γ = `ttt_length`, no sequential or confidence head)."""
    config = draft.config
    if isinstance(draft, Eagle3DraftModel):
        return {
            "path": getattr(draft, "benchmark_path", None),
            "kind": "EAGLE-3",
            "markov_head_type": "autoregressive",
            "block_size": config.ttt_length,
            "num_hidden_layers": config.num_hidden_layers,
            "markov_rank": None,
            "confidence_head": False,
            "dtype": str(draft.dtype),
        }
    return {
        "path": getattr(draft, "benchmark_path", None),
        "kind": "DFlash" if config.markov_head_type == "none" else "DSpark",
        "markov_head_type": config.markov_head_type,
        "block_size": config.block_size,
        "num_hidden_layers": config.num_hidden_layers,
        "markov_rank": config.markov_rank if config.markov_head_type != "none" else None,
        "confidence_head": config.confidence_head,
        "dtype": str(draft.dtype),
    }


def load_prompts(args: argparse.Namespace) -> dict:
    return load_prompt_sets(args.eval_dir, args.datasets, args.limit)


def chat_input_ids(tokenizer, text: str, device) -> torch.Tensor:
    """The chat-templated prompt of one user turn, `(1, length)`."""
    messages = [{"role": "user", "content": text}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"].to(device)


def warm_up(
    target, tokenizer, draft, prompt_lookup_num_tokens: int | None, draft_generate_kwargs: dict | None = None
) -> None:
    """One short untimed generation per method, so one-time costs do not land in the first timed prompt."""
    input_ids = chat_input_ids(tokenizer, "Count from one to ten.", target.device)
    kwargs = {
        "max_new_tokens": 8,
        "do_sample": False,
        "pad_token_id": tokenizer.eos_token_id,
        "attention_mask": torch.ones_like(input_ids),
    }
    with torch.no_grad():
        target.generate(input_ids, assistant_model=draft, **(draft_generate_kwargs or {}), **kwargs)
        target.generate(input_ids, **kwargs)
        if prompt_lookup_num_tokens:
            target.generate(input_ids, prompt_lookup_num_tokens=prompt_lookup_num_tokens, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Running the harness
# ----------------------------------------------------------------------------------------------------------------------


def run_harness(
    target,
    tokenizer,
    draft,
    prompts: dict,
    args: argparse.Namespace,
    *,
    label: str,
    mode: str,
    compare_plain: bool = False,
    prompt_lookup_num_tokens: int | None = None,
    draft_prompt_lookup_num_tokens: int | None = None,
    draft_generate_kwargs: dict | None = None,
) -> list[dict]:
    """`dspark_hf.evaluation.evaluate`, one dataset at a time (seeded, with a progress line each).

    `draft_generate_kwargs` go to the draft's `generate()` calls only (e.g. `verification_policy`).

    Each summary also gets `position_counts` (see `position_counts`); the confidence logits of every round are
    dropped from `rounds_detail` to keep the JSON small.
    """
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": mode == "sampled",
        "temperature": args.temperature,
        "compare_plain": compare_plain,
        "prompt_lookup_num_tokens": prompt_lookup_num_tokens,
        "draft_prompt_lookup_num_tokens": draft_prompt_lookup_num_tokens,
        "draft_generate_kwargs": draft_generate_kwargs,
        "progress": False,
    }
    warm_up(target, tokenizer, draft, prompt_lookup_num_tokens, draft_generate_kwargs)
    summaries = []
    for name, conversations in prompts.items():
        resume = None if args.resume_dir is None else Path(args.resume_dir) / args.output_name / label / mode
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        (summary,) = evaluate(target, tokenizer, draft, {name: conversations}, output_dir=resume, **settings)
        summary["rounds_detail"].pop("confidence_logits", None)
        summary["position_counts"] = position_counts(summary["rounds_detail"])
        summaries.append(summary)
        speeds = f"{summary['dspark_tokens_per_s']:.1f} tok/s"
        if summary["plain_tokens_per_s"]:
            speeds += f" (plain {summary['plain_tokens_per_s']:.1f}"
            if summary["prompt_lookup_tokens_per_s"]:
                speeds += f", prompt lookup {summary['prompt_lookup_tokens_per_s']:.1f}"
            speeds += ")"
        print(
            f"[{label} | {mode}] {name}: {summary['turns']} turns, {summary['new_tokens']} tokens, "
            f"τ {summary['tau']:.3f}, {speeds}, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return summaries


def each_draft_and_mode(
    target, tokenizer, drafts: dict, prompts: dict, args: argparse.Namespace, **baselines
):
    """Yields `(name, mode, summaries)`: `run_harness` for every draft and every mode of --modes."""
    for name, draft in drafts.items():
        for mode in args.modes:
            yield (
                name,
                mode,
                run_harness(target, tokenizer, draft, prompts, args, label=name, mode=mode, **baselines),
            )


def pooled_summary(summaries: list[dict]) -> dict:
    """τ and speeds over all rounds and tokens of `summaries` (all datasets as one domain)."""
    return domain_summaries([{**s, "domain": "all"} for s in summaries])[0]


def draft_cost_lines(report: dict) -> list[str]:
    """Markdown table of the draft's and the target's time per round, pooled over datasets, for every run of
    `report["results"]` (`{name: {mode: {"datasets": [summary, ...]}}}`; a variant `draft+suffix` has its draft's
    kind)."""
    lines = [
        "## Draft cost per round (pooled over datasets)",
        "",
        "Wall-clock time inside `generate()`: drafting (the draft's forwards and sampling) and verification (the "
        "target's pass, acceptance, rollback), divided by the rounds; same machine load for every row only as far "
        "as the machine allows (one process, drafts run one after another).",
        "",
        "| draft | kind | mode | rounds | draft ms / round | verify ms / round | draft share |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, modes in report["results"].items():
        kind = report["drafts"].get(name.partition("+")[0], {}).get("kind", "–")
        for mode, result in modes.items():
            summaries = result["datasets"]
            rounds = sum(s["rounds"] for s in summaries)
            drafting = sum(s["draft_time_s"] or 0.0 for s in summaries)
            verifying = sum(s["verify_time_s"] or 0.0 for s in summaries)
            if not rounds:
                continue
            lines.append(
                f"| {name} | {kind} | {mode} | {rounds} | {fmt(1000 * drafting / rounds, 1)} | "
                f"{fmt(1000 * verifying / rounds, 1)} | {fmt(100 * drafting / max(drafting + verifying, 1e-9), 1)}% |"
            )
    return lines + [""]


def macro_average(values) -> float | None:
    """Unweighted mean over datasets (the paper's "Avg." column), None values skipped."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


# ----------------------------------------------------------------------------------------------------------------------
# Per-position acceptance
# ----------------------------------------------------------------------------------------------------------------------


def position_counts(rounds: dict) -> dict:
    """Counts per drafted position k = 1..γ from a round record (`proposed`, `accepted`, `block_size`).

    `proposed_at_least[k]`: rounds that sent ≥ k drafted tokens; `reached[k]`: of those, rounds whose positions
    < k were all accepted; `accepted[k]`: rounds whose first k positions were all accepted. So
    P(accept k | accepted k−1) = accepted / reached and the prefix survival P(accept 1..k) = accepted /
    proposed_at_least, the quantities of `SpeculationStats.conditional_acceptance` / `prefix_survival`.
    """
    size = rounds["block_size"]
    counts = {
        "rounds": len(rounds["proposed"]),
        "proposed_at_least": [0] * size,
        "reached": [0] * size,
        "accepted": [0] * size,
    }
    for proposed, accepted in zip(rounds["proposed"], rounds["accepted"], strict=True):
        for k in range(proposed):
            counts["proposed_at_least"][k] += 1
            counts["reached"][k] += int(k <= accepted)
            counts["accepted"][k] += int(k < accepted)
    return counts


def merge_counts(parts: list[dict]) -> dict:
    """Sums position counts (of datasets, say); shorter blocks are padded with zeros."""
    size = max(len(p["accepted"]) for p in parts)
    merged = {"rounds": sum(p["rounds"] for p in parts)}
    for key in ("proposed_at_least", "reached", "accepted"):
        merged[key] = [sum(p[key][k] for p in parts if k < len(p[key])) for k in range(size)]
    return merged


def acceptance_curves(counts: dict) -> dict:
    """`conditional` P(accept k | accepted k−1) and `survival` P(accept 1..k) per position (None: never reached)."""

    def ratio(num, den):
        return [n / d if d else None for n, d in zip(num, den, strict=True)]

    return {
        "conditional": ratio(counts["accepted"], counts["reached"]),
        "survival": ratio(counts["accepted"], counts["proposed_at_least"]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "**MISSED**")


def report_header(title: str, report: dict, dtypes: str | None = None) -> list[str]:
    """Title, command, machine and drafts of a report, as markdown lines (`dtypes` describes the models; default:
    the run's --dtype for target and drafts)."""
    env = report["environment"]
    if dtypes is None:
        dtypes = f"target and drafts in {report.get('settings', {}).get('dtype', DTYPE)}"
    lines = [
        f"# {title}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {env['machine']}, {env['cpu_count']} CPU cores, {env['torch_threads']} torch threads; "
        f"torch {env['torch']}, transformers {env['transformers']}; {dtypes}. "
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in env['load_average_before'])}"
        + (
            f"; after: {', '.join(f'{v:.2f}' for v in env['load_average_after'])}"
            if "load_average_after" in env
            else ""
        )
        + f". Started {env['started']}.",
        "",
    ]
    if report.get("drafts"):
        lines += [
            "| draft | kind | sequential head | γ | layers | rank | confidence head | path |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, info in report["drafts"].items():
            lines.append(
                f"| {name} | {info['kind']} | {info['markov_head_type']} | {info['block_size']} | "
                f"{info['num_hidden_layers']} | {info['markov_rank'] or '–'} | {info['confidence_head']} | "
                f"{info['path'] or '(fresh, untrained)'} |"
            )
        lines.append("")
    return lines


def figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib figure (Agg backend) and its axes as a 2-D array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def write_results(name: str, report: dict, markdown, plot=None) -> None:
    """Writes benchmarks/results/<name>.json, `.md` from `markdown(report)` (also printed) and `.png` from
    `plot(report)`, a figure, after recording the load average at the end of the run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    report["environment"]["load_average_after"] = list(os.getloadavg())
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (RESULTS / f"{name}.md").write_text(markdown(report), encoding="utf-8")
    written = "json,md"
    if plot is not None:
        fig = plot(report)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{name}.png", dpi=120)
        written += ",png"
    print(markdown(report), file=sys.stderr)
    print(f"wrote {RESULTS / name}.{{{written}}}", file=sys.stderr)
