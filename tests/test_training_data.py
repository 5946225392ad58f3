"""Data preparation, collator and anchor sampling for DSpark training (tiny offline tokenizer and target)."""

import json
import re

import datasets
import pytest
import torch
from conftest import make_target, make_tokenizer

from dspark_hf.training import (
    DSparkDataCollator,
    build_blocks,
    build_training_dataset,
    conversation_features,
    default_sampling_settings,
    frequent_token_ids,
    load_prompts,
    normalize_prompt,
    read_jsonl,
    regenerate_responses,
    sample_anchor_positions,
    tokenize_conversations,
    vocabulary_coverage,
)

VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def target():
    return make_target("llama", vocab_size=VOCAB, hidden_size=32, eos_token_id=6, pad_token_id=0, bos_token_id=2)


# -- tokenization ----------------------------------------------------------------------------------------------------


def _masked_tokens(tokenizer, features):
    return [
        tokenizer.convert_ids_to_tokens(i)
        for i, m in zip(features["input_ids"], features["loss_mask"], strict=True)
        if m
    ]


def test_loss_mask_covers_assistant_tokens_only(tokenizer):
    messages = [
        {"role": "system", "content": "w40 w41"},
        {"role": "user", "content": "w1 w2 w3"},
        {"role": "assistant", "content": "w10 w11"},
        {"role": "user", "content": "w4"},
        {"role": "assistant", "content": "w20 w21 w22"},
    ]
    features = conversation_features(tokenizer, messages)
    assert len(features["input_ids"]) == len(features["loss_mask"])
    assert _masked_tokens(tokenizer, features) == ["w10", "w11", "<|end|>", "w20", "w21", "w22", "<|end|>"]
    # Every assistant label is preceded by a non-assistant token at the start of each turn (the header).
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"])
    for i, m in enumerate(features["loss_mask"]):
        if m and not features["loss_mask"][i - 1]:
            assert tokens[i - 1] == "<|assistant|>"


def test_truncation_and_dataset(tokenizer):
    conversations = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3 w4 w5"}],
        },
        {
            "id": "b",
            "messages": [
                {"role": "user", "content": "w1 w1 w1 w1 w1 w1"},
                {"role": "assistant", "content": "w9"},
            ],
        },
    ]
    dataset = tokenize_conversations(conversations, tokenizer, max_length=6)
    # "b" loses its assistant turn to truncation and is dropped.
    assert dataset["id"] == ["a"]
    row = dataset[0]
    assert len(row["input_ids"]) == 6 == row["num_tokens"]
    assert row["loss_mask"] == [0, 0, 0, 0, 1, 1]


def test_normalize_prompt_layouts():
    ours = normalize_prompt({"turns": ["q1", "q2"], "system": "s", "category": "chat", "source": "x"})
    assert ours["turns"] == ["q1", "q2"] and ours["system"] == "s"
    assert ours["meta"] == {"category": "chat", "source": "x"}
    messages = normalize_prompt(
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "old answer"},
                {"role": "user", "content": "q2"},
            ]
        }
    )
    assert messages["turns"] == ["q1", "q2"] and messages["system"] == "s"
    assert messages["id"] == ours["id"]  # same conversation, same id
    plain = normalize_prompt({"prompt": "q"})
    assert plain["turns"] == ["q"] and plain["system"] is None
    with pytest.raises(ValueError):
        normalize_prompt({"text": "nothing usable"})


def test_load_prompts_filters_and_dedups(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"turns": ["a"], "category": "math"},
        {"turns": ["b"], "category": "chat"},
        {"turns": ["a"], "category": "math"},
        {"turns": ["c", "d"], "category": "chat"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"turns": ["trunc')
    prompts = load_prompts(path)
    assert [p["turns"] for p in prompts] == [["a"], ["b"], ["c", "d"]]
    assert [p["turns"] for p in load_prompts(path, categories=["chat"], limit=1)] == [["b"]]
    # Disjoint slices of one shuffled order (parallel generation workers), counted after deduplication.
    order = [p["id"] for p in load_prompts(path, shuffle=True, seed=3)]
    slices = [load_prompts(path, shuffle=True, seed=3, offset=k, limit=2) for k in (0, 2)]
    assert [p["id"] for s in slices for p in s] == order and [len(s) for s in slices] == [2, 1]
    with pytest.raises(ValueError, match="offset"):
        load_prompts(path, offset=-1)
    import datasets

    assert len(load_prompts(datasets.Dataset.from_list([{"prompt": "x"}, {"prompt": "y"}]))) == 2
    # Held-out prompts: leave out those of a conversations file (as written by regenerate_responses).
    trained = tmp_path / "trained.responses.jsonl"
    trained.write_text(json.dumps({"id": prompts[1]["id"], "messages": [{"role": "user", "content": "b"}]}) + "\n")
    assert [p["turns"] for p in load_prompts(path, exclude=trained)] == [["a"], ["c", "d"]]
    assert [p["turns"] for p in load_prompts(path, exclude={prompts[0]["id"]})] == [["b"], ["c", "d"]]


def test_default_sampling_settings(target):
    assert default_sampling_settings(target) == {"do_sample": False}
    assert default_sampling_settings(target, temperature=0.5) == {"do_sample": True, "temperature": 0.5}
    target.generation_config.do_sample = True
    target.generation_config.temperature = 0.7
    target.generation_config.top_p = 0.9
    try:
        settings = default_sampling_settings(target)
        assert settings["do_sample"] and settings["temperature"] == 0.7 and settings["top_p"] == 0.9
        assert default_sampling_settings(target, do_sample=False) == {"do_sample": False}
    finally:
        target.generation_config.do_sample = False
        target.generation_config.temperature = 1.0
        target.generation_config.top_p = 1.0


# -- regeneration ----------------------------------------------------------------------------------------------------


def test_regenerate_multi_turn_and_resume(tmp_path, target, tokenizer, monkeypatch):
    prompts = load_prompts(
        [
            {"turns": ["w1 w2"], "category": "chat"},
            {"turns": ["w3", "w4 w5"], "system": "w6", "category": "chat"},
            {"turns": ["w7 w8 w9 w10"], "category": "math"},
        ]
    )
    out = tmp_path / "responses.jsonl"
    calls = []
    original = target.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        # Left padding: the last prompt column is never padding.
        assert kwargs["attention_mask"][:, -1].all()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, "generate", counting_generate)
    rows = regenerate_responses(
        target, tokenizer, prompts[:2], out, batch_size=2, max_new_tokens=3, progress=False
    )
    assert len(rows) == 2 and len(calls) == 2  # one batch, two turns (second turn: one active conversation)
    assert calls[1][0] == 1
    multi = next(r for r in rows if len(r["finish_reasons"]) == 2)
    roles = [m["role"] for m in multi["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert multi["messages"][3]["content"] == "w4 w5"
    assert multi["category"] == "chat"
    assert all(n <= 3 for n in multi["num_generated_tokens"])

    # Resume: only the new prompt is generated; earlier rows are returned unchanged.
    calls.clear()
    rows2 = regenerate_responses(
        target, tokenizer, prompts, out, batch_size=2, max_new_tokens=3, progress=False
    )
    assert len(calls) == 1 and calls[0][0] == 1
    assert [r["id"] for r in rows2] == [p["id"] for p in prompts]
    assert rows2[:2] == rows
    assert len(read_jsonl(out)) == 3


def test_build_training_dataset_round_trip(tmp_path, target, tokenizer):
    import datasets

    prompts = [{"turns": ["w1 w2"]}, {"turns": ["w3", "w4"]}]
    dataset = build_training_dataset(
        target, tokenizer, prompts, tmp_path / "data", max_new_tokens=4, batch_size=2, progress=False
    )
    reloaded = datasets.load_from_disk(str(tmp_path / "data"))
    assert len(reloaded) == len(dataset) == 2
    assert {"input_ids", "loss_mask", "num_tokens", "id"} <= set(reloaded.column_names)
    assert (tmp_path / "data.responses.jsonl").exists()
    for row in reloaded:
        assert sum(row["loss_mask"]) > 0


def test_cli_prepare_data(tmp_path, target, tokenizer):
    import datasets

    from dspark_hf.cli import run_command

    model_dir = tmp_path / "target"
    target.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"turns": [f"w{i} w{i + 1}"], "category": "chat"}) for i in range(10, 15))
    )
    config = tmp_path / "prepare.json"
    config.write_text(
        json.dumps({"max_new_tokens": 2, "batch_size": 4, "num_prompts": 3, "no_progress": True})
    )
    run_command(
        [
            "prepare-data",
            "--config",
            str(config),
            "--target",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "out"),
            "--greedy",
        ]
    )
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 3
    assert len(read_jsonl(tmp_path / "out.responses.jsonl")) == 3


@pytest.mark.parametrize(
    "rows, extra, match",
    [
        ("", [], "No prompts to answer"),  # an empty file
        ('{"turns": ["a"], "category": "chat"}\n', ["--categories", "math"], "No prompts to answer"),
        ('{"turns": ["a"]}\n[1]\n', [], r"prompts\.jsonl:2"),
        ('{"turns": ["a"]}\n', ["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_cli_prepare_data_checks_its_prompts_before_loading_the_target(tmp_path, capsys, rows, extra, match):
    from dspark_hf.cli import main

    (tmp_path / "prompts.jsonl").write_text(rows, encoding="utf-8")
    arguments = ["prepare-data", "--target", str(tmp_path / "no-such-target"), "--prompts",
                 str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out"), *extra]
    assert main(arguments) == 1  # the target path does not exist: the prompt error must come first
    error = capsys.readouterr().err
    assert re.search(match, error) and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_build_training_dataset_refuses_to_save_nothing(tmp_path, target, tokenizer):
    with pytest.raises(ValueError, match="No prompts"):
        build_training_dataset(target, tokenizer, [], tmp_path / "data", progress=False)
    with pytest.raises(ValueError, match="nothing was saved"):  # every prompt is longer than the cap
        build_training_dataset(target, tokenizer, [{"turns": ["w1 w2 w3 w4"]}], tmp_path / "data",
                               max_prompt_tokens=1, max_new_tokens=2, progress=False)
    assert not (tmp_path / "data").exists()


def _answers_dataset():
    import datasets

    # Assistant tokens (mask 1): 5 ×4, 9 ×2, 7 ×2, 3 ×1, 6 ×1; the prompt tokens 1, 2 and 8 are not counted.
    return datasets.Dataset.from_dict(
        {
            "input_ids": [[1, 2, 5, 5, 9, 6], [8, 8, 8, 5, 7, 9], [2, 5, 7, 3]],
            "loss_mask": [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1]],
        }
    )


def test_frequent_token_ids_counts_answer_tokens_only():
    dataset = _answers_dataset()
    assert frequent_token_ids(dataset, 3) == ([5, 7, 9], 8 / 10)  # 7 and 9 tie: lower id first
    assert frequent_token_ids(dataset, 3, always_include=[6]) == ([6, 5, 7], 7 / 10)
    assert frequent_token_ids(dataset, 50) == ([5, 7, 9, 3, 6], 1.0)  # fewer distinct tokens than asked
    with pytest.raises(ValueError, match="always_include"):
        frequent_token_ids(dataset, 1, always_include=[6, 7])
    with pytest.raises(ValueError, match="loss_mask"):
        frequent_token_ids(dataset.remove_columns("loss_mask"), 3)


def test_cli_draft_vocab(tmp_path, target):
    from dspark_hf import DSparkDraftModel
    from dspark_hf.cli import run_command

    draft = DSparkDraftModel.from_target(target, block_size=3, markov_rank=4, mask_token_id=VOCAB - 1)
    draft.save_pretrained(tmp_path / "draft")
    _answers_dataset().save_to_disk(str(tmp_path / "data"))
    token_ids, coverage = run_command(
        ["draft-vocab", "--draft", str(tmp_path / "draft"), "--data", str(tmp_path / "data"), "--size", "3",
         "--out", str(tmp_path / "restricted")]
    )
    assert token_ids == [6, 5, 7] and coverage == 7 / 10  # the target's EOS (6) is always kept
    loaded = DSparkDraftModel.from_pretrained(tmp_path / "restricted")
    assert loaded.draft_vocab_ids.tolist() == [5, 6, 7]
    assert "3 tokens, covering 70.00% of the answer tokens" in (tmp_path / "restricted" / "README.md").read_text()
    held_out = datasets.Dataset.from_dict({"input_ids": [[1, 5, 9, 4, 4]], "loss_mask": [[0, 1, 1, 1, 1]]})
    held_out.save_to_disk(str(tmp_path / "held_out"))
    run_command(
        ["draft-vocab", "--draft", str(tmp_path / "draft"), "--data", str(tmp_path / "data"), "--size", "3",
         "--held-out-data", str(tmp_path / "held_out"), "--out", str(tmp_path / "restricted_held_out")]
    )
    card = (tmp_path / "restricted_held_out" / "README.md").read_text()
    assert "70.00% of the answer tokens" in card and "25.00% of those of" in card  # only the 5 of 5, 9, 4, 4


def test_vocabulary_coverage_counts_answer_tokens_only():
    dataset = _answers_dataset()
    assert vocabulary_coverage(dataset, [5, 9]) == 6 / 10
    assert vocabulary_coverage(dataset, []) == 0.0
    assert vocabulary_coverage(dataset, range(100)) == 1.0
    with pytest.raises(ValueError, match="loss_mask"):
        vocabulary_coverage(dataset.remove_columns("loss_mask"), [5])


# -- collator and anchors --------------------------------------------------------------------------------------------


def test_collator_pads_right():
    collator = DSparkDataCollator(pad_token_id=0)
    batch = collator(
        [
            {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "id": "x"},
            {"input_ids": [8, 9], "loss_mask": [0, 1]},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch["input_ids"].dtype == torch.long
    padded = DSparkDataCollator(tokenizer=make_tokenizer(), pad_to_multiple_of=4, max_length=3)(
        [{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [1] * 5}]
    )
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0]]


def test_anchor_sampling_only_where_first_label_is_assistant():
    generator = torch.Generator().manual_seed(0)
    for _trial in range(200):
        length = int(torch.randint(2, 30, (1,), generator=generator))
        loss_mask = (torch.rand(3, length, generator=generator) < 0.4).long()
        attention = torch.ones(3, length, dtype=torch.long)
        attention[0, length // 2 :] = 0
        num = int(torch.randint(1, 8, (1,), generator=generator))
        anchors, valid = sample_anchor_positions(
            loss_mask, num, 4, generator=generator, attention_mask=attention
        )
        assert anchors.shape == valid.shape and anchors.shape[1] <= num
        labels_ok = loss_mask.bool() & attention.bool()
        for b in range(3):
            chosen = anchors[b][valid[b]].tolist()
            assert len(set(chosen)) == len(chosen)
            assert chosen == sorted(chosen)
            for p in chosen:
                assert p + 1 < length and labels_ok[b, p + 1]
            expected = int(labels_ok[b, 1:].sum())
            assert len(chosen) == min(expected, anchors.shape[1])


def test_anchor_sampling_is_reproducible():
    loss_mask = torch.ones(2, 40, dtype=torch.long)
    draws = [
        sample_anchor_positions(loss_mask, 5, 4, generator=torch.Generator().manual_seed(3))[0]
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


def test_build_blocks_masks_positions_per_block():
    input_ids = torch.arange(10, 20).unsqueeze(0)  # tokens 10..19
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1]])
    anchors = torch.tensor([[1, 3, 8, 0]])
    anchor_valid = torch.tensor([[True, True, True, False]])
    blocks = build_blocks(input_ids, loss_mask, anchors, anchor_valid, block_size=3, mask_token_id=99)
    assert blocks.input_ids.tolist() == [[11, 99, 99, 13, 99, 99, 18, 99, 99, 10, 99, 99]]
    assert blocks.position_ids.tolist() == [[1, 2, 3, 3, 4, 5, 8, 9, 10, 0, 1, 2]]
    assert blocks.valid.tolist() == [
        [
            [True, True, True],  # labels x2, x3, x4: assistant
            [True, False, False],  # x4 ok, x5 is not assistant, x6 masked after the gap
            [True, False, False],  # x9 ok, x10 beyond the sequence
            [False, False, False],  # padding slot
        ]
    ]
    assert blocks.labels[0, 0].tolist() == [12, 13, 14]
    assert blocks.prev_ids[0, 0].tolist() == [11, 12, 13]
    assert blocks.target_positions[0, 2].tolist() == [8, 9, 9]


def test_regenerate_skips_prompts_longer_than_max_prompt_tokens(tmp_path, target, tokenizer):
    prompts = load_prompts([{"turns": ["w1"]}, {"turns": [" ".join(["w2"] * 30)]}])
    rows = regenerate_responses(
        target,
        tokenizer,
        prompts,
        tmp_path / "r.jsonl",
        max_new_tokens=2,
        max_prompt_tokens=10,
        progress=False,
    )
    assert [r["id"] for r in rows] == [prompts[0]["id"]]
