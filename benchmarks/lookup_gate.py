"""When should a round verify a prompt-lookup continuation instead of the drafted block?

Runs the first turn of `--limit` prompts per dataset greedily with `generate(assistant_model=draft,
prompt_lookup_num_tokens=N, lookup_min_probability=0)`, so every continuation the lookup finds is
verified. In each such round it also drafts the block the draft would have proposed. Afterwards it compares, round by
round, the looked-up tokens the target accepted with the drafted tokens that agree with the final greedy output (the
tokens the target would have accepted from the block), grouped by the kind of match (2-gram or 1 token) and by the
draft's probability of the continuation's first token. This is the evidence behind `lookup_min_probability`.
Writes benchmarks/results/<output-name>.{json,md}.

    python benchmarks/lookup_gate.py --drafts dspark_g4_10k=src/dspark_hf/default_draft \
        --eval-dir ../shared/data/eval --limit 10 --max-new-tokens 256 --threads 2
"""

from contextlib import contextmanager
from itertools import pairwise
from unittest import mock

import _common as common
import torch

from dspark_hf.evaluation import DATASET_DOMAINS, agreeing_tokens
from dspark_hf.speculative.decoding import DSparkProposer

PROBABILITY_EDGES = (0.0, 0.001, 0.01, 0.1, 1.0)


@contextmanager
def recording_lookups(records: list[dict]):
    """Appends, for every round whose lookup finds a continuation, the match kind, the draft's probability of the
    continuation's first token, the drafted block `(1, k)` and the round's start length."""
    look_up = DSparkProposer._look_up

    def recording_look_up(self, input_ids, budget):
        continuation = look_up(self, input_ids, budget)
        if continuation is not None:
            block = self._draft(input_ids, min(self.draft.config.block_size, budget))
            records.append({
                "start": input_ids.shape[1],
                "match": 2 if self._long_match(input_ids) else 1,
                "draft_probability": float(torch.softmax(block.logits[0, 0], dim=-1)[continuation[0, 0]]),
                "draft_tokens": block.tokens,
            })
        return continuation

    with mock.patch.object(DSparkProposer, "_look_up", recording_look_up):
        yield


def lookup_rounds(target, tokenizer, draft, prompt: str, args) -> list[dict]:
    """The looked-up rounds of one greedy turn, with what the lookup and the drafted block gain in each."""
    input_ids = common.chat_input_ids(tokenizer, prompt, target.device)
    records = []
    with torch.no_grad(), recording_lookups(records):
        output = target.generate(
            input_ids, assistant_model=draft, prompt_lookup_num_tokens=args.lookup_tokens, lookup_min_probability=0.0,
            do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
            attention_mask=torch.ones_like(input_ids), return_dict_in_generate=True,
        )
    output, stats = output.sequences, output.speculation_stats
    starts, length = [], input_ids.shape[1] + 1  # the prefill emits one token before the first round
    for accepted in stats.accepted:
        starts.append(length)
        length += accepted + 1
    accepted_at = {start: a for start, a, looked_up in zip(starts, stats.accepted, stats.looked_up, strict=True)
                   if looked_up}
    rows = []
    for record in records:
        drafted, start = record.pop("draft_tokens"), record["start"]
        # Drafted tokens that agree with the greedy output from the round's start: those the target would accept.
        agreeing = agreeing_tokens(output[:, start : start + drafted.shape[1]], drafted, prompt_length=0)
        rows.append({**record, "lookup_accepted": accepted_at[start], "draft_accepted": agreeing})
    return rows


def group_rows(rows: list[dict]) -> list[dict]:
    """Mean gains per match kind and draft-probability bin."""
    groups = [("2-gram match", lambda r: r["match"] == 2)]
    for low, high in pairwise(PROBABILITY_EDGES):
        last = high == PROBABILITY_EDGES[-1]  # the last bin includes its upper edge
        groups.append((
            f"1-token match, draft p ∈ [{low:g}, {high:g}{']' if last else ')'}",
            lambda r, low=low, high=high, last=last: r["match"] == 1
            and (low <= r["draft_probability"] < high or (last and r["draft_probability"] == high)),
        ))
    summary = []
    for name, selected in groups:
        chosen = [r for r in rows if selected(r)]
        if not chosen:
            continue
        summary.append({
            "group": name,
            "rounds": len(chosen),
            "lookup_accepted": sum(r["lookup_accepted"] for r in chosen) / len(chosen),
            "draft_accepted": sum(r["draft_accepted"] for r in chosen) / len(chosen),
            "lookup_better": sum(r["lookup_accepted"] > r["draft_accepted"] for r in chosen) / len(chosen),
            "draft_better": sum(r["draft_accepted"] > r["lookup_accepted"] for r in chosen) / len(chosen),
        })
    return summary


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = common.report_header("Prompt lookup or the drafted block: which gains more in a round?", report)
    lines += [
        f"First turn of the first {settings['limit']} prompts of each dataset, greedy, max_new_tokens="
        f"{settings['max_new_tokens']}, prompt_lookup_num_tokens={settings['lookup_tokens']}, every found "
        "continuation verified (`lookup_min_probability = 0`). Per looked-up round: the looked-up tokens the target "
        "accepted, and the drafted tokens (block drafted in the same round, not verified) that agree with the final "
        "greedy output. Neither counts the round's bonus token. A looked-up round verifies up to "
        f"{settings['lookup_tokens']} tokens where a block has γ.",
        "",
    ]
    for name, result in report["results"].items():
        lines += [
            f"## {name}",
            "",
            f"{result['looked_up_rounds']} looked-up rounds over {result['turns']} turns.",
            "",
            "| round's match | rounds | looked-up tokens accepted | drafted tokens that would be accepted | "
            "lookup gains more | block gains more |",
            "|---|---|---|---|---|---|",
        ]
        for domain, groups in result["groups"].items():
            for g in groups:
                lines.append(
                    f"| {domain}: {g['group']} | {g['rounds']} | {g['lookup_accepted']:.2f} | "
                    f"{g['draft_accepted']:.2f} | {g['lookup_better']:.0%} | {g['draft_better']:.0%} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.decoding_parser(__doc__, "lookup_gate", modes=("greedy",))
    parser.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens.")
    prepared = common.prepare(parser, __file__, argv)
    if prepared is None:
        return 0
    args, target, tokenizer, drafts, report = prepared
    if args.modes != ["greedy"]:
        parser.error("lookup_gate.py decodes greedily only (the drafted block is scored against the greedy output).")
    prompts = common.load_prompts(args)
    report["results"] = {}
    for name, draft in drafts.items():
        rows, turns = [], 0
        for dataset, conversations in prompts.items():
            for conversation in conversations:
                rows += [
                    {"dataset": dataset, **row}
                    for row in lookup_rounds(target, tokenizer, draft, conversation[0], args)
                ]
                turns += 1
            print(f"{name} {dataset}: {len(rows)} looked-up rounds so far", flush=True)
        domains = sorted({DATASET_DOMAINS.get(r["dataset"], "other") for r in rows})
        groups = {"all": group_rows(rows)}
        groups.update({d: group_rows([r for r in rows if DATASET_DOMAINS.get(r["dataset"], "other") == d])
                       for d in domains})
        report["results"][name] = {"turns": turns, "looked_up_rounds": len(rows), "groups": groups, "rows": rows}
    common.write_results(args.output_name, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
