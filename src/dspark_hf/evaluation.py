"""Evaluation harness: τ, acceptance and wall-clock speed of a draft on JSONL prompt sets.

For every prompt (every turn of multi-turn prompts, answered in order with the target's own answers as history)
the harness runs `target.generate(assistant_model=draft)` and, in the same loop, plain `generate` and
transformers' prompt-lookup decoding, so speeds are compared under the same machine load. Results are kept per
dataset and per domain (math / code / chat), written as JSON + markdown, and each finished dataset is saved at
once so an interrupted run resumes where it stopped.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.utils import ModelOutput

from .jsonl import read_jsonl
from .speculative.stats import SpeculationStats
from .targets import chat_input_ids

DATASET_DOMAINS = {
    "gsm8k": "math",
    "math500": "math",
    "humaneval": "code",
    "mbpp": "code",
    "mt-bench": "chat",
    "alpacaeval": "chat",
}


def load_prompt_sets(directory: str | Path, datasets: list[str] | None = None, limit: int | None = None) -> dict:
    """`{dataset: [turns, ...]}` from `<directory>/<dataset>.jsonl` files with a `turns` list per line."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of prompts per dataset, got {limit}.")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Prompt folder {directory} does not exist: pass a folder of <dataset>.jsonl files (a `turns` list per "
            "line)."
        )
    names = datasets or sorted(p.stem for p in directory.glob("*.jsonl"))
    sets = {}
    for name in names:
        path = directory / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; available: {sorted(p.stem for p in directory.glob('*.jsonl'))}.")
        rows = read_jsonl(path)
        if not rows:
            raise ValueError(f"{path} holds no prompts: give one JSON object with a `turns` list per line.")
        for i, row in enumerate(rows):
            turns = row.get("turns")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise ValueError(
                    f"{path}: prompt {i + 1} needs a non-empty `turns` list of non-empty strings, got {turns!r:.80}."
                )
        sets[name] = [row["turns"] for row in rows[:limit]]
    return sets


@dataclass
class DatasetResult:
    """Measurements of one dataset. Times are summed over all turns; speeds are generated tokens per second."""

    dataset: str
    domain: str
    prompts: int
    turns: int
    new_tokens: int
    stats: SpeculationStats
    dspark_s: float
    plain_s: float | None = None
    plain_tokens: int | None = None
    prompt_lookup_s: float | None = None
    prompt_lookup_tokens: int | None = None
    greedy_identical: bool | None = None
    greedy_agreeing_tokens: int | None = None
    prompt_lookup_agreeing_tokens: int | None = None
    mean_confidence: list[float | None] = field(default_factory=list)

    @property
    def dspark_tokens_per_s(self) -> float:
        return self.new_tokens / self.dspark_s

    @property
    def plain_tokens_per_s(self) -> float | None:
        if self.plain_s is None:
            return None
        # Sampled plain decoding stops at its own EOS, so it is timed over its own tokens (None: same as DSpark's).
        return (self.new_tokens if self.plain_tokens is None else self.plain_tokens) / self.plain_s

    @property
    def prompt_lookup_tokens_per_s(self) -> float | None:
        if self.prompt_lookup_s is None:
            return None
        return self.prompt_lookup_tokens / self.prompt_lookup_s

    def _agreement(self, agreeing_tokens: int | None) -> float | None:
        """Share of plain greedy decoding's tokens that a method reproduced before its first differing token."""
        if agreeing_tokens is None or not self.plain_tokens:
            return None
        return agreeing_tokens / self.plain_tokens

    def summary(self) -> dict:
        plain, lookup = self.plain_tokens_per_s, self.prompt_lookup_tokens_per_s
        return {
            "dataset": self.dataset,
            "domain": self.domain,
            "prompts": self.prompts,
            "turns": self.turns,
            "new_tokens": self.new_tokens,
            "rounds": self.stats.num_rounds,
            "tau": self.stats.tau,
            "conditional_acceptance": self.stats.conditional_acceptance(),
            "prefix_survival": self.stats.prefix_survival(),
            "mean_confidence": self.mean_confidence,
            "dspark_tokens_per_s": self.dspark_tokens_per_s,
            "plain_tokens": self.plain_tokens,
            "plain_tokens_per_s": plain,
            "prompt_lookup_tokens": self.prompt_lookup_tokens,
            "prompt_lookup_tokens_per_s": lookup,
            "speedup_vs_plain": None if plain is None else self.dspark_tokens_per_s / plain,
            "speedup_vs_prompt_lookup": None if lookup is None else self.dspark_tokens_per_s / lookup,
            "greedy_identical": self.greedy_identical,
            "greedy_agreement": self._agreement(self.greedy_agreeing_tokens),
            "prompt_lookup_greedy_agreement": self._agreement(self.prompt_lookup_agreeing_tokens),
            "looked_up_rounds": sum(self.stats.looked_up),
            "draft_time_s": self.stats.draft_time_s,
            "verify_time_s": self.stats.verify_time_s,
        }


def mean_confidence_by_position(stats: SpeculationStats, draft) -> list[float | None]:
    """Mean confidence c_k of the verified positions, k = 1..γ: calibrated for a DSpark draft, the draft's own
    probability of its token for an EAGLE-3 draft (whose confidence logits are those probabilities' log-odds)."""
    sums, counts = [0.0] * stats.block_size, [0] * stats.block_size
    calibrate = getattr(draft, "calibrated_confidence", None)
    for logits in stats.confidence_logits:
        if logits:
            logits = torch.tensor(logits)
            values = torch.sigmoid(logits) if calibrate is None else calibrate(logits, positions=slice(0, len(logits)))
            for k, value in enumerate(values.tolist()):
                sums[k] += value
                counts[k] += 1
    return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first position where token ids `(len,)` differ over their common length, or None."""
    length = min(a.numel(), b.numel())
    differs = torch.nonzero(a[:length] != b[:length])
    return int(differs[0, 0]) if differs.numel() else None


@dataclass
class GreedyDivergence:
    """The first token where two greedy outputs of one target differ, with the target's logits of both there."""

    position: int
    plain_token: int
    other_token: int
    plain_logit: float
    other_logit: float
    is_tie: bool


def first_divergence(target, plain: torch.Tensor, other: torch.Tensor) -> GreedyDivergence | None:
    """Compares two greedy outputs `(1, len)` of `target` (plain decoding and another method); None if one is a
    prefix of the other.

    At the first differing position the target is run once over plain decoding's prefix. In bf16 its multi-token
    passes and one-token steps round differently, so two candidates within a rounding step of each other can swap:
    `is_tie` when their logits differ by at most 2·eps·max|logit| of the target's dtype.
    """
    position = _first_difference(plain[0], other[0])
    if position is None:
        return None
    with torch.no_grad():
        logits = target(plain[:, :position]).logits[0, -1].float()
    plain_token, other_token = int(plain[0, position]), int(other[0, position])
    gap = abs(float(logits[plain_token] - logits[other_token]))
    return GreedyDivergence(
        position=position,
        plain_token=plain_token,
        other_token=other_token,
        plain_logit=float(logits[plain_token]),
        other_logit=float(logits[other_token]),
        is_tie=gap <= 2 * torch.finfo(target.dtype).eps * float(logits.abs().max()),
    )


def agreeing_tokens(plain: torch.Tensor, output: torch.Tensor, prompt_length: int) -> int:
    """How many generated tokens (after `prompt_length`) two outputs `(1, len)`, plain decoding's and another
    method's, share before they first differ."""
    plain, output = plain[0, prompt_length:], output[0, prompt_length:]
    position = _first_difference(plain, output)
    return min(plain.numel(), output.numel()) if position is None else position


def timed_generate(target, input_ids: torch.Tensor, **generate_kwargs) -> tuple[torch.Tensor | ModelOutput, float]:
    """The output of `target.generate(input_ids, **generate_kwargs)`, run without gradients (attention mask all ones
    unless given), and its wall-clock seconds."""
    generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    started = time.perf_counter()
    with torch.no_grad():
        output = target.generate(input_ids, **generate_kwargs)
    return output, time.perf_counter() - started


def evaluate_dataset(
    target,
    tokenizer,
    draft,
    name: str,
    conversations: list[list[str]],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    compare_plain: bool = True,
    prompt_lookup_num_tokens: int | None = 10,
    draft_prompt_lookup_num_tokens: int | None = None,
    draft_generate_kwargs: dict | None = None,
    progress: bool = True,
) -> DatasetResult:
    """Runs every turn of `conversations` with the draft (and the baselines) and aggregates the rounds.

    `prompt_lookup_num_tokens` sets the prompt-lookup baseline (None skips it); `draft_prompt_lookup_num_tokens` is
    passed to the draft's own `generate()` calls, whose rounds then verify a looked-up continuation when there is one.
    `draft_generate_kwargs` are further keyword arguments of those calls only, such as `verification_policy` or
    `lookup_min_probability` (see `dspark_hf.speculative.speculative_decoding`).
    """
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tokenizer.eos_token_id}
    draft_settings = {
        "assistant_model": draft,
        "prompt_lookup_num_tokens": draft_prompt_lookup_num_tokens,
        "return_dict_in_generate": True,
        **(draft_generate_kwargs or {}),
    }
    if do_sample:
        settings.update(temperature=temperature, top_k=0, top_p=1.0)
    iterator = conversations
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(conversations, desc=name, unit="prompt")
    parts, new_tokens, turns, dspark_s = [], 0, 0, 0.0
    plain_s, plain_tokens = (0.0, 0) if compare_plain else (None, None)
    lookup_s, lookup_tokens = (0.0, 0) if prompt_lookup_num_tokens else (None, None)
    identical = True if compare_plain and not do_sample else None
    # Greedy only: how far each method follows plain decoding before it first differs (bf16 rounding, see docs).
    agreeing = 0 if identical is not None else None
    lookup_agreeing = 0 if identical is not None and prompt_lookup_num_tokens else None
    for conversation in iterator:
        messages = []
        for turn in conversation:
            messages.append({"role": "user", "content": turn})
            input_ids = chat_input_ids(tokenizer, messages, target.device)
            generated, seconds = timed_generate(target, input_ids, **draft_settings, **settings)
            output = generated.sequences
            parts.append(generated.speculation_stats)
            if compare_plain:
                plain, plain_seconds = timed_generate(target, input_ids, **settings)
                plain_s += plain_seconds
                plain_tokens += plain.shape[1] - input_ids.shape[1]
                if identical is not None:
                    identical = identical and torch.equal(plain, output)
                    agreeing += agreeing_tokens(plain, output, input_ids.shape[1])
            if prompt_lookup_num_tokens:
                lookup, lookup_seconds = timed_generate(
                    target, input_ids, prompt_lookup_num_tokens=prompt_lookup_num_tokens, **settings
                )
                lookup_s += lookup_seconds
                lookup_tokens += lookup.shape[1] - input_ids.shape[1]
                if lookup_agreeing is not None:
                    lookup_agreeing += agreeing_tokens(plain, lookup, input_ids.shape[1])
            dspark_s += seconds
            new_tokens += output.shape[1] - input_ids.shape[1]
            turns += 1
            answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
    stats = SpeculationStats.merge(parts)
    return DatasetResult(
        dataset=name,
        domain=DATASET_DOMAINS.get(name, "other"),
        prompts=len(conversations),
        turns=turns,
        new_tokens=new_tokens,
        stats=stats,
        dspark_s=dspark_s,
        plain_s=plain_s,
        plain_tokens=plain_tokens,
        prompt_lookup_s=lookup_s,
        prompt_lookup_tokens=lookup_tokens,
        greedy_identical=identical,
        greedy_agreeing_tokens=agreeing,
        prompt_lookup_agreeing_tokens=lookup_agreeing,
        mean_confidence=mean_confidence_by_position(stats, draft),
    )


def evaluate(
    target,
    tokenizer,
    draft,
    prompt_sets: dict[str, list[list[str]]],
    output_dir: str | Path | None = None,
    **kwargs,
) -> list[dict]:
    """Evaluates every dataset; with `output_dir`, saves `<dataset>.json` as each finishes and skips those present."""
    summaries = []
    for name, conversations in prompt_sets.items():
        path = None if output_dir is None else Path(output_dir) / f"{name}.json"
        if path is not None and path.exists():
            summaries.append(json.loads(path.read_text()))
            continue
        result = evaluate_dataset(target, tokenizer, draft, name, conversations, **kwargs)
        summary = result.summary()
        summary["rounds_detail"] = asdict(result.stats)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2))
        summaries.append(summary)
    return summaries


def _pooled_speed(rows: list[dict], speed_key: str, tokens_key: str | None = None) -> float | None:
    """Tokens per second over all tokens of `rows` (each row's own token count, else its DSpark count)."""
    if not all(r.get(speed_key) for r in rows):
        return None
    tokens = [r["new_tokens"] if r.get(tokens_key) is None else r[tokens_key] for r in rows]
    return sum(tokens) / sum(t / r[speed_key] for t, r in zip(tokens, rows, strict=True))


def domain_summaries(summaries: list[dict]) -> list[dict]:
    """Per domain: τ over all rounds of its datasets, and speeds (and speed-ups) over all their tokens."""
    domains = {}
    for summary in summaries:
        domains.setdefault(summary["domain"], []).append(summary)
    result = []
    for domain, rows in sorted(domains.items()):
        stats = SpeculationStats.merge([SpeculationStats(**row["rounds_detail"]) for row in rows])
        dspark = _pooled_speed(rows, "dspark_tokens_per_s")
        entry = {"domain": domain, "datasets": [r["dataset"] for r in rows], "tau": stats.tau,
                 "conditional_acceptance": stats.conditional_acceptance(), "dspark_tokens_per_s": dspark}
        for baseline in ("plain", "prompt_lookup"):
            speed = _pooled_speed(rows, f"{baseline}_tokens_per_s", f"{baseline}_tokens")
            if speed is not None:
                entry[f"{baseline}_tokens_per_s"] = speed
                entry[f"speedup_vs_{baseline}"] = dspark / speed
        result.append(entry)
    return result


def markdown_table(summaries: list[dict]) -> str:
    """A Table-1 style markdown table of the per-dataset summaries."""

    def fmt(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    def percent(value):
        return "–" if value is None else f"{value:.0%}"

    lines = [
        "| dataset | domain | turns | τ | DSpark tok/s | plain tok/s | prompt lookup tok/s | × plain | × lookup "
        "| greedy identical | greedy agreement DSpark / lookup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['dataset']} | {s['domain']} | {s['turns']} | {fmt(s['tau'])} | {fmt(s['dspark_tokens_per_s'], 1)} | "
            f"{fmt(s['plain_tokens_per_s'], 1)} | {fmt(s['prompt_lookup_tokens_per_s'], 1)} | "
            f"{fmt(s['speedup_vs_plain'])} | {fmt(s['speedup_vs_prompt_lookup'])} | {s['greedy_identical']} | "
            f"{percent(s.get('greedy_agreement'))} / {percent(s.get('prompt_lookup_greedy_agreement'))} |"
        )
    return "\n".join(lines) + "\n"
