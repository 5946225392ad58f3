"""Speed of generate()'s DSpark decoding loop against the path it replaced, turn by turn in one run.

Until dspark_hf owned its decoding loop, `generate(assistant_model=draft)` fed transformers' private assisted-decoding
loop a candidate generator (`--previous` names that commit; default b37d189, the last one with it). This script
extracts that commit's `src/dspark_hf` into a temporary folder, imports it beside the current package as
`dspark_hf_previous`, loads the same draft weights into both, and runs every turn greedily three ways in a rotating
order: plain `generate`, the previous path, the current loop. Both draft paths must return the same tokens.

Besides wall-clock speed it splits each call's time with forward hooks: the target's forwards, the draft backbone's
forwards, and the rest ("outside the forwards": the sequential head's sampling, acceptance, cache rollback, stopping
criteria and Python bookkeeping), reported per round.

Writes benchmarks/results/<output-name>.{json,md} (default loop_speed). Run with transformers 5.24 (the previous path
needs its private assisted-decoding loop):

    python benchmarks/loop_speed.py --eval-dir ../shared/data/eval --limit 3 --max-new-tokens 128 --threads 2
"""

import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import _common as common
import torch

from dspark_hf import DSparkDraftModel

DEFAULT_DRAFT = common.ROOT / "src" / "dspark_hf" / "default_draft"
METHODS = ("plain", "previous", "current")


def import_previous(ref: str, folder: Path):
    """The package `src/dspark_hf` of commit `ref`, imported as `dspark_hf_previous`."""
    archive = subprocess.run(
        ["git", "-C", str(common.ROOT), "archive", ref, "src/dspark_hf"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "src" / "dspark_hf"
    spec = importlib.util.spec_from_file_location(
        "dspark_hf_previous", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dspark_hf_previous"] = module
    spec.loader.exec_module(module)
    return module


class ForwardClock:
    """Seconds spent inside `module`'s forward calls (a pre-hook starts the clock, a hook stops it)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._started = 0.0, None
        self._handles = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _start(self, *_):
        self._started = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._started

    def reset(self) -> None:
        self.seconds = 0.0


def timed_call(target, input_ids, draft, clocks, args) -> dict:
    for clock in clocks.values():
        clock.reset()
    kwargs = {"assistant_model": draft} if draft is not None else {}
    current = isinstance(draft, DSparkDraftModel)  # the previous path kept its statistics on the draft
    if current:
        kwargs["return_dict_in_generate"] = True
    started = time.perf_counter()
    with torch.no_grad():
        output = target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=args.max_new_tokens,
            pad_token_id=args.pad_token_id, **kwargs,
        )
    seconds = time.perf_counter() - started
    stats = output.speculation_stats if current else getattr(draft, "last_generate_stats", None)
    output = output.sequences if current else output
    result = {"seconds": seconds, "tokens": output.shape[1] - input_ids.shape[1], "output": output}
    if draft is not None:
        forwards = clocks["target"].seconds + clocks[id(draft)].seconds
        result.update(
            rounds=stats.num_rounds, tau=stats.tau, target_forward_s=clocks["target"].seconds,
            draft_forward_s=clocks[id(draft)].seconds, outside_forwards_s=seconds - forwards,
        )
    return result


def measure(args) -> dict:
    env = common.setup(args)
    target, tokenizer = common.load_target(args.target, dtype=common.DTYPE)
    args.pad_token_id = tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as folder:
        previous = import_previous(args.previous, Path(folder))
        drafts = {
            "current": DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=target.dtype).eval(),
            "previous": previous.DSparkDraftModel.from_pretrained(
                args.draft, target_model=target, dtype=target.dtype
            ).eval(),
        }
    clocks = {"target": ForwardClock(target)}
    for draft in drafts.values():
        clocks[id(draft)] = ForwardClock(draft)
    prompts = common.load_prompts(args)
    report = common.start_report("loop_speed", __file__, args.argv, args, env)
    report["previous_ref"] = args.previous
    warm = common.chat_input_ids(tokenizer, "Count from one to ten.", target.device)
    for method in METHODS:
        timed_call(target, warm, drafts.get(method), clocks, args)
    turns, order = [], 0
    for dataset, conversations in prompts.items():
        for conversation in conversations:
            input_ids = common.chat_input_ids(tokenizer, conversation[0], target.device)
            results = {}
            for method in METHODS[order % 3 :] + METHODS[: order % 3]:  # rotating: load hits every method alike
                results[method] = timed_call(target, input_ids, drafts.get(method), clocks, args)
            order += 1
            same = torch.equal(results["previous"].pop("output"), results["current"].pop("output"))
            results["plain"].pop("output")
            turns.append({"dataset": dataset, "identical_draft_outputs": same, **results})
            speed = {m: r["tokens"] / r["seconds"] for m, r in results.items()}
            print(
                f"{dataset}: plain {speed['plain']:.1f} tok/s, previous {speed['previous']:.1f}, current "
                f"{speed['current']:.1f}, identical {same}", file=sys.stderr,
            )
    report["turns"] = turns
    report["summary"] = summarize(turns)
    return report


def summarize(turns: list[dict]) -> dict:
    def speed(turn, method):
        return turn[method]["tokens"] / turn[method]["seconds"]

    def per_round(method, key):
        return statistics.median(t[method][key] / t[method]["rounds"] * 1e3 for t in turns if t[method]["rounds"])

    return {
        "turns": len(turns),
        "identical_draft_outputs": sum(t["identical_draft_outputs"] for t in turns),
        "median_speed_tok_s": {m: statistics.median(speed(t, m) for t in turns) for m in METHODS},
        "median_ratio_current_vs_previous": statistics.median(
            speed(t, "current") / speed(t, "previous") for t in turns
        ),
        "median_ratio_current_vs_plain": statistics.median(speed(t, "current") / speed(t, "plain") for t in turns),
        "median_ratio_previous_vs_plain": statistics.median(speed(t, "previous") / speed(t, "plain") for t in turns),
        "tau": {m: statistics.median(t[m]["tau"] for t in turns) for m in ("previous", "current")},
        "per_round_ms": {
            m: {
                key: per_round(m, key)
                for key in ("seconds", "target_forward_s", "draft_forward_s", "outside_forwards_s")
            }
            for m in ("previous", "current")
        },
    }


def markdown(report: dict) -> str:
    s = report["summary"]
    env = report["environment"]
    lines = [
        "# generate()'s decoding loop vs the previous assisted-decoding path",
        "",
        f"`{report['command']}`",
        "",
        f"transformers {env['transformers']}, torch {env['torch']}, {env['torch_threads']} threads, target and draft in "
        f"{common.DTYPE}, greedy, {s['turns']} turns of {report['settings']['max_new_tokens']} new tokens; the previous "
        f"path is commit {report['previous_ref']}. Both draft paths returned identical tokens on "
        f"{s['identical_draft_outputs']}/{s['turns']} turns.",
        "",
        "| | plain | previous path | current loop |",
        "|---|---|---|---|",
        "| median tok/s | " + " | ".join(common.fmt(s["median_speed_tok_s"][m], 1) for m in METHODS) + " |",
        f"| median × plain (turn by turn) | 1.00 | {s['median_ratio_previous_vs_plain']:.2f} | "
        f"{s['median_ratio_current_vs_plain']:.2f} |",
        f"| median τ | | {s['tau']['previous']:.2f} | {s['tau']['current']:.2f} |",
        "",
        f"**Current loop vs previous path: {s['median_ratio_current_vs_previous']:.3f}×** (median of per-turn speed "
        "ratios).",
        "",
        "Per round (median over turns of each call's time / its rounds, ms):",
        "",
        "| | whole round | target forwards | draft backbone forwards | outside the forwards |",
        "|---|---|---|---|---|",
    ]
    for method in ("previous", "current"):
        r = s["per_round_ms"][method]
        lines.append(
            f"| {method} | {r['seconds']:.2f} | {r['target_forward_s']:.2f} | {r['draft_forward_s']:.2f} | "
            f"{r['outside_forwards_s']:.2f} |"
        )
    lines += [
        "",
        "\"Outside the forwards\" is everything but the target's and the draft backbone's forward calls: the sequential "
        "head's left-to-right sampling and the confidence head, the draft's context projection, logits processing, "
        "acceptance, cache rollback, stopping criteria and Python bookkeeping (the prefill's share included).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__, "loop_speed")
    parser.add_argument("--target", default="smollm2", help="Target model (dspark_hf.targets.load_target name or path).")
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT), help="Draft folder (default: the built-in draft).")
    parser.add_argument("--previous", default="b37d189", help="Commit whose generate() path is compared.")
    parser.add_argument("--eval-dir", default=str(common.EVAL_DIR))
    parser.add_argument("--limit", type=int, default=3, help="Prompts per dataset.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = argv
    if common.missing_eval_dir(args):
        return
    report = measure(args)
    common.write_results(args.output_name, report, markdown)


if __name__ == "__main__":
    main()
