"""Evaluation harness: metric arithmetic on hand-made rounds, prompt loading, an end-to-end run on a tiny model."""

import json

import pytest
import torch
from conftest import make_target, make_tokenizer

from dspark_hf import DSparkDraftModel, Eagle3DraftModel, SpeculationStats
from dspark_hf.evaluation import (
    DatasetResult,
    domain_summaries,
    evaluate,
    first_divergence,
    load_prompt_sets,
    markdown_table,
)
from dspark_hf.evaluation import agreeing_tokens as _agreeing_tokens


def hand_made_stats() -> SpeculationStats:
    """γ = 3; rounds (proposed, accepted): (3,3) (3,1) (3,0) (2,2) (0,0)."""
    stats = SpeculationStats(block_size=3)
    for proposed, accepted in [(3, 3), (3, 1), (3, 0), (2, 2), (0, 0)]:
        stats.record_round(proposed, accepted)
    return stats


def test_tau_counts_the_bonus_token():
    assert hand_made_stats().tau == pytest.approx((3 + 1 + 0 + 2 + 0 + 5) / 5)


def test_conditional_acceptance_vs_prefix_survival():
    stats = hand_made_stats()
    # Position 1 reached in the 4 rounds that proposed ≥ 1: accepted in 3.
    # Position 2 reached only where position 1 survived and ≥ 2 proposed: rounds 1, 2, 4 → accepted in 1 and 4.
    # Position 3 reached where 1-2 survived and 3 proposed: round 1 only → accepted.
    assert stats.conditional_acceptance() == pytest.approx([3 / 4, 2 / 3, 1.0])
    # Unconditional survival: P(first k all accepted) over rounds that proposed ≥ k.
    assert stats.prefix_survival() == pytest.approx([3 / 4, 2 / 4, 1 / 3])


def test_merge_concatenates_rounds():
    a, b = hand_made_stats(), SpeculationStats(block_size=4)
    b.record_round(4, 4)
    b.draft_time_s = 1.5
    merged = SpeculationStats.merge([a, b])
    assert merged.block_size == 4 and merged.num_rounds == 6 and merged.draft_time_s == 1.5
    assert merged.tau == pytest.approx((6 + 4 + 6) / 6)
    with pytest.raises(ValueError):
        SpeculationStats.merge([])


def test_record_round_rejects_impossible_counts():
    with pytest.raises(ValueError, match="accepted"):
        SpeculationStats(block_size=2).record_round(1, 2)


def test_baseline_speeds_use_their_own_token_counts():
    """Sampled baselines stop at their own EOS: each speed divides its own tokens by its own time."""
    stats = hand_made_stats()
    result = DatasetResult("gsm8k", "math", prompts=1, turns=1, new_tokens=100, stats=stats, dspark_s=10.0,
                           plain_s=10.0, plain_tokens=50, prompt_lookup_s=4.0, prompt_lookup_tokens=20)
    summary = result.summary()
    assert summary["plain_tokens_per_s"] == 5.0 and summary["prompt_lookup_tokens_per_s"] == 5.0
    assert summary["speedup_vs_plain"] == summary["speedup_vs_prompt_lookup"] == 2.0
    other = DatasetResult("math500", "math", prompts=1, turns=1, new_tokens=10, stats=stats, dspark_s=10.0,
                          plain_s=5.0, plain_tokens=10, prompt_lookup_s=1.0, prompt_lookup_tokens=10)
    rows = [{**s.summary(), "rounds_detail": vars(stats)} for s in (result, other)]
    (domain,) = domain_summaries(rows)
    # Pooled over datasets: DSpark 110 tokens / 20 s, plain 60 / 15 s, prompt lookup 30 / 5 s.
    assert domain["dspark_tokens_per_s"] == pytest.approx(5.5)
    assert domain["plain_tokens_per_s"] == pytest.approx(4.0) and domain["speedup_vs_plain"] == pytest.approx(1.375)
    assert domain["prompt_lookup_tokens_per_s"] == pytest.approx(6.0)
    assert domain["speedup_vs_prompt_lookup"] == pytest.approx(5.5 / 6.0)


def test_greedy_agreement_counts_tokens_before_the_first_difference():
    prompt = [7, 7, 7]
    plain = torch.tensor([prompt + [1, 2, 3, 4, 5]])
    assert _agreeing_tokens(plain, torch.tensor([prompt + [1, 2, 9, 4, 5]]), 3) == 2
    assert _agreeing_tokens(plain, torch.tensor([prompt + [1, 2, 3]]), 3) == 3  # stopped early, no difference
    assert _agreeing_tokens(plain, plain, 3) == 5
    result = DatasetResult(
        dataset="gsm8k", domain="math", prompts=2, turns=2, new_tokens=16, stats=SpeculationStats(block_size=4),
        dspark_s=1.0, plain_s=1.0, plain_tokens=16, greedy_identical=False, greedy_agreeing_tokens=12,
    )
    summary = result.summary()
    assert summary["greedy_agreement"] == 0.75 and summary["prompt_lookup_greedy_agreement"] is None
    assert "| False | 75% / – |" in markdown_table([summary])


def test_first_divergence_reports_the_targets_logits_there():
    target = make_target("llama", vocab_size=64).eval()
    plain = torch.tensor([[3, 9, 4, 12, 5, 6]])
    other = torch.tensor([[3, 9, 4, 12, 30, 31, 32]])
    divergence = first_divergence(target, plain, other)
    with torch.no_grad():
        logits = target(plain[:, :4]).logits[0, -1]
    assert (divergence.position, divergence.plain_token, divergence.other_token) == (4, 5, 30)
    assert (divergence.plain_logit, divergence.other_logit) == (float(logits[5]), float(logits[30]))
    assert not divergence.is_tie  # 0.07 apart in float32
    # In bf16 two tokens with the same rounded logit are a tie.
    target = target.to(torch.bfloat16)
    with torch.no_grad():
        logits = target(plain[:, :4]).logits[0, -1].tolist()
    first, second = next((a, b) for a in range(64) for b in range(a + 1, 64) if logits[a] == logits[b])
    plain[0, 4], other[0, 4] = first, second
    assert first_divergence(target, plain, other).is_tie
    assert first_divergence(target, plain, plain) is None
    assert first_divergence(target, plain, plain[:, :3]) is None  # stopped earlier, no differing token


def test_load_prompt_sets(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text('{"turns": ["a"]}\n{"turns": ["b"]}\n')
    (tmp_path / "mt-bench.jsonl").write_text('{"turns": ["x", "y"]}\n')
    assert load_prompt_sets(tmp_path, limit=1) == {"gsm8k": [["a"]], "mt-bench": [["x", "y"]]}
    with pytest.raises(FileNotFoundError, match="available"):
        load_prompt_sets(tmp_path, ["humaneval"])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="turns"):
        load_prompt_sets(tmp_path, ["bad"])


def test_prompt_files_with_line_separators_and_blank_lines_load(tmp_path):
    (tmp_path / "chat.jsonl").write_text('\n{"turns": ["one\u2028two"]}\n\n{"turns": ["three"]}\n', encoding="utf-8")
    assert load_prompt_sets(tmp_path) == {"chat": [["one\u2028two"], ["three"]]}


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"turns": ["a"]}\n\n{"turns": ["b"\n', r"bad\.jsonl:3: not valid JSON"),
        ('{"turns": ["a"]}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
        ('{"turns": [123]}\n', "non-empty strings"),
        ("", "holds no prompts"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompt_files_name_the_file_and_line(tmp_path, text, match):
    (tmp_path / "bad.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_prompt_sets(tmp_path, ["bad"])


def test_cli_errors_are_one_line_with_a_nonzero_status(tmp_path, capsys):
    from dspark_hf.cli import main

    (tmp_path / "bad.jsonl").write_text('{"turns": ["a"]}\n[1]\n', encoding="utf-8")
    arguments = ["eval", "--target", str(tmp_path / "missing"), "--draft", "d", "--prompts-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "dspark-hf eval: error:" in error and "bad.jsonl:2" in error  # prompts are checked before any model loads
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    (tmp_path / "bad.jsonl").unlink()
    (tmp_path / "good.jsonl").write_text('{"turns": ["a"]}\n', encoding="utf-8")
    assert main(arguments) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["--debug", *arguments])


def test_evaluate_end_to_end_and_resume(tmp_path):
    tokenizer = make_tokenizer(64)
    target = make_target("llama", vocab_size=64)
    target.generation_config.eos_token_id = None
    draft = DSparkDraftModel.from_target(target, tokenizer=tokenizer, block_size=4, num_hidden_layers=1).eval()
    prompts = {"gsm8k": [["w1 w2 w3"]], "mt-bench": [["w4 w5", "w6"]]}
    summaries = evaluate(target, tokenizer, draft, prompts, output_dir=tmp_path, max_new_tokens=12,
                         prompt_lookup_num_tokens=3, progress=False)
    math, chat = summaries
    assert (math["domain"], chat["domain"]) == ("math", "chat")
    assert chat["turns"] == 2 and chat["new_tokens"] == 24
    assert math["greedy_identical"] is True and chat["greedy_identical"] is True
    assert math["greedy_agreement"] == 1.0 and chat["prompt_lookup_greedy_agreement"] == 1.0
    # The prefill gives 1 of the 12 tokens; every round gives its accepted tokens plus one.
    assert math["rounds"] * math["tau"] == pytest.approx(11)
    assert math["plain_tokens_per_s"] > 0 and math["prompt_lookup_tokens_per_s"] > 0
    saved = json.loads((tmp_path / "gsm8k.json").read_text())
    assert saved["tau"] == math["tau"]
    # A second call reads the finished datasets instead of recomputing them.
    (tmp_path / "gsm8k.json").write_text(json.dumps({**saved, "tau": 99.0}))
    again = evaluate(target, tokenizer, draft, prompts, output_dir=tmp_path, max_new_tokens=12, progress=False)
    assert again[0]["tau"] == 99.0
    assert math["plain_tokens"] == math["new_tokens"] == math["prompt_lookup_tokens"]  # greedy: same outputs
    domains = {d["domain"]: d for d in domain_summaries(summaries)}
    assert domains["chat"]["tau"] == pytest.approx(chat["tau"]) and "speedup_vs_plain" in domains["math"]
    assert domains["math"]["speedup_vs_prompt_lookup"] == pytest.approx(math["speedup_vs_prompt_lookup"])
    baselines_skipped = evaluate(target, tokenizer, draft, {"gsm8k": prompts["gsm8k"]}, max_new_tokens=4,
                                 compare_plain=False, prompt_lookup_num_tokens=None, progress=False)
    assert baselines_skipped[0]["plain_tokens_per_s"] is None and baselines_skipped[0]["speedup_vs_prompt_lookup"] is None
    assert "speedup_vs_plain" not in domain_summaries(baselines_skipped)[0]
    table = markdown_table(summaries)
    assert table.count("\n") == 4 and "| gsm8k | math | 1 |" in table
    assert math["looked_up_rounds"] == 0
    (hybrid,) = evaluate(target, tokenizer, draft, {"gsm8k": [["w1 w2 w1 w2 w1 w2"]]}, max_new_tokens=12,
                         draft_prompt_lookup_num_tokens=4, progress=False)
    assert hybrid["greedy_identical"] is True and 0 < hybrid["looked_up_rounds"] <= hybrid["rounds"]


def test_evaluate_an_eagle3_draft_reports_its_own_probabilities():
    """EAGLE-3 drafts have no calibration: the mean confidence per position is the mean probability the draft gave its
    verified tokens, in (0, 1)."""
    tokenizer = make_tokenizer(64)
    target = make_target("llama", vocab_size=64)
    target.generation_config.eos_token_id = None
    draft = Eagle3DraftModel.from_target(target, num_hidden_layers=1, ttt_length=3).eval()
    (summary,) = evaluate(target, tokenizer, draft, {"gsm8k": [["w1 w2 w3"]]}, max_new_tokens=10, progress=False)
    assert summary["greedy_identical"] is True and summary["rounds"] * summary["tau"] == pytest.approx(9)
    confidences = [c for c in summary["mean_confidence"] if c is not None]
    assert confidences and all(0.0 < c < 1.0 for c in confidences)


def test_eval_cli(tmp_path):
    from dspark_hf.cli import run_command

    tokenizer = make_tokenizer(64)
    target = make_target("llama", vocab_size=64)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    DSparkDraftModel.from_target(target, tokenizer=tokenizer, block_size=3).save_pretrained(tmp_path / "draft")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "humaneval.jsonl").write_text('{"turns": ["w1 w2"]}\n{"turns": ["w3"]}\n')
    report = run_command([
        "eval", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
        "--prompts-dir", str(tmp_path / "prompts"), "--limit", "1", "--max-new-tokens", "6", "--out", str(tmp_path / "out"),
        "--draft-lookup-tokens", "3", "--lookup-min-probability", "0", "--device", "cpu",
    ])
    assert report["datasets"][0]["turns"] == 1 and report["domains"][0]["domain"] == "code"
    assert (tmp_path / "out" / "table.md").read_text().startswith("| dataset |")
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]
    assert settings["limit"] == 1 and settings["draft_lookup_tokens"] == 3 and settings["device"] == "cpu"
    assert settings["lookup_min_probability"] == 0.0


def test_gguf_targets_load_dense(tmp_path, monkeypatch):
    """A .gguf target is dequantized at load (the draft reads its LM-head matrix; packed layers would fetch Hub
    kernels), on the device asked for; the tokenizer gets the file but not the quantization settings."""
    import transformers

    from dspark_hf.targets import load_target

    calls = {}

    def record(name):
        def from_pretrained(cls, path, **kwargs):
            calls[name] = (path, kwargs)
            return torch.nn.Linear(1, 1)

        return classmethod(from_pretrained)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    (tmp_path / "m.gguf").write_bytes(b"")
    load_target(str(tmp_path / "m.gguf"), device="cuda:1")
    path, kwargs = calls["model"]
    assert path == str(tmp_path) and kwargs["gguf_file"] == "m.gguf" and kwargs["device_map"] == "cuda:1"
    assert kwargs["quantization_config"].dequantize is True and kwargs["dtype"] == torch.float32
    assert calls["tokenizer"] == (str(tmp_path), {"gguf_file": "m.gguf"})


def test_device_option_places_target_and_draft(tmp_path):
    """`--device` reaches from_pretrained as device_map (meta stands in for a GPU here), the draft follows the target,
    and `train` has no such option because accelerate places the target."""
    from dspark_hf.cli import build_parser
    from dspark_hf.targets import load_target

    target = make_target("llama", vocab_size=64)
    target.save_pretrained(tmp_path / "target")
    DSparkDraftModel.from_target(target, block_size=3).save_pretrained(tmp_path / "draft")
    moved, _ = load_target(str(tmp_path / "target"), require_tokenizer=False, device="meta")
    assert moved.device.type == "meta"
    assert DSparkDraftModel.from_pretrained(tmp_path / "draft", target_model=moved).device.type == "meta"
    kept = DSparkDraftModel.from_pretrained(tmp_path / "draft", target_model=moved, device_map="cpu")
    assert kept.device.type == "cpu"
    parser = build_parser()
    for command in ("eval", "prepare-data", "cache-features", "calibrate", "serve"):
        assert parser.parse_args([command, "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--device", "cuda"])
