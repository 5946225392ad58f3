"""DSparkTrainer: training forward == inference forward, frozen target, checkpoints, resume, eval, PEFT, CLI."""

import json
import os

import datasets
import pytest
import torch
from conftest import make_target as make_tiny_target
from safetensors.torch import load_file

from dspark_hf import DSparkDraftModel
from dspark_hf.training import (
    DraftTrainingResult,
    DSparkDataCollator,
    DSparkTrainer,
    DSparkTrainingArguments,
    apply_draft_vocabulary,
    build_training_draft,
    compute_dspark_loss,
    load_training_datasets,
    run_target,
    train,
)

VOCAB = 96
MASK = VOCAB - 1
BLOCK = 4


def make_target(seed: int = 0):
    return make_tiny_target("llama", vocab_size=VOCAB, hidden_size=32, seed=seed, pad_token_id=0)


def make_draft(target, seed: int = 1, **overrides) -> DSparkDraftModel:
    torch.manual_seed(seed)
    settings = dict(
        block_size=BLOCK, num_hidden_layers=2, markov_rank=8, mask_token_id=MASK, target_layer_ids=[0, 2]
    )
    settings.update(overrides)
    draft = DSparkDraftModel.from_target(target, **settings)
    if draft.markov_head is not None:  # zero-initialised: give the Markov term something to do
        torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.5)
    return draft


def make_dataset(num: int = 8, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num):
        length = 10 + (i * 3) % 9
        prompt = 3 + i % 4
        ids = torch.randint(1, VOCAB - 1, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return datasets.Dataset.from_list(rows)


def training_args(tmp_path, **overrides) -> DSparkTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        num_anchors=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=7,
    )
    settings.update(overrides)
    return DSparkTrainingArguments(**settings)


def padded_batch(rows: tuple[int, ...] = (1, 4)) -> dict:
    """These examples of `make_dataset()`, collated; rows 1 and 4 differ in length, so the shorter is padded."""
    return DSparkDataCollator(pad_token_id=0)([make_dataset()[i] for i in rows])


def seeded_loss(draft, target, batch: dict, num_anchors: int = 5):
    """`compute_dspark_loss` over `batch` with `num_anchors` per row from a fixed generator (no gradients)."""
    with torch.no_grad():
        return compute_dspark_loss(
            draft,
            target,
            batch["input_ids"],
            batch["loss_mask"],
            batch["attention_mask"],
            num_anchors=num_anchors,
            generator=torch.Generator().manual_seed(0),
        )


@pytest.fixture(scope="module")
def target():
    return make_target()


# -- training forward == inference forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["markov", "gated", "rnn", "none"])
def test_training_block_logits_match_per_block_inference(target, head):
    draft = make_draft(target, markov_head_type=head).eval()
    batch = padded_batch()
    loss, output, blocks = seeded_loss(draft, target, batch)
    with torch.no_grad():
        features, _ = run_target(
            target, batch["input_ids"], batch["attention_mask"], draft.config.target_layer_ids
        )
        checked = 0
        for b in range(batch["input_ids"].shape[0]):
            for i in range(blocks.anchors.shape[1]):
                if not blocks.anchor_valid[b, i]:
                    continue
                p = int(blocks.anchors[b, i])
                block_ids = torch.tensor([[int(batch["input_ids"][b, p])] + [MASK] * (BLOCK - 1)])
                single = draft(
                    input_ids=block_ids,
                    position_ids=torch.arange(p, p + BLOCK).unsqueeze(0),
                    target_hidden_states=features[b : b + 1, :p],
                    context_position_ids=torch.arange(p).unsqueeze(0),
                )
                prev = blocks.prev_ids[b : b + 1, i]
                expected = draft.sequential_logits(single.logits, single.hidden_states, prev)
                torch.testing.assert_close(output.logits[b, i], expected[0], atol=1e-5, rtol=1e-5)
                conf = draft.confidence_logits(single.hidden_states, prev)
                torch.testing.assert_close(output.confidence_logits[b, i], conf[0], atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 6
    assert torch.isfinite(loss.loss)


def test_the_loss_runs_one_draft_forward_through_a_wrapper(target):
    """DDP and PEFT synchronise what runs inside the wrapped module's forward: the loss calls the wrapper once per
    batch, heads included (`prev_ids`), and never swaps the draft's forward."""

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like to unwrap_draft
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, []

        def forward(self, **kwargs):
            self.calls.append(sorted(kwargs))
            assert "forward" not in vars(self.module)
            return self.module(**kwargs)

    draft = make_draft(target)
    wrapper = Wrapper(draft)
    _, output, blocks = seeded_loss(wrapper, target, padded_batch())
    assert len(wrapper.calls) == 1 and "prev_ids" in wrapper.calls[0]
    assert output.logits.shape[:3] == blocks.labels.shape and output.confidence_logits.shape == blocks.labels.shape


def test_target_logits_are_the_targets_own(target):
    draft = make_draft(target)
    batch = DSparkDataCollator(pad_token_id=0)([make_dataset()[2]])
    captured = {}

    def spy(logits, target_logits, *args, **kwargs):
        captured["target"] = target_logits
        from dspark_hf.training.losses import dspark_loss

        return dspark_loss(logits, target_logits, *args, **kwargs)

    import dspark_hf.training.trainer as trainer_module

    original = trainer_module.dspark_loss
    trainer_module.dspark_loss = spy
    try:
        with torch.no_grad():
            _, _, blocks = compute_dspark_loss(
                draft, target, batch["input_ids"], batch["loss_mask"], num_anchors=3
            )
    finally:
        trainer_module.dspark_loss = original
    full = target(batch["input_ids"]).logits  # (1, L, V)
    for i in range(blocks.anchors.shape[1]):
        for k in range(BLOCK):
            if blocks.valid[0, i, k]:
                position = int(blocks.anchors[0, i]) + k  # logits at p+k−1 (0-based k) predict label x_{p+k}
                torch.testing.assert_close(
                    captured["target"][0, i, k], full[0, position], atol=1e-5, rtol=1e-5
                )


@pytest.mark.parametrize("head", ["markov", "gated", "rnn", "none"])
def test_draft_vocabulary_loss_is_the_full_loss_restricted_to_its_tokens(target, head):
    """With a draft vocabulary, the loss equals `dspark_loss` over the vocabulary's columns of the full-vocabulary
    draft and target logits, labels renumbered to those columns and CE skipping labels outside."""
    from dspark_hf.training.losses import dspark_loss

    draft = make_draft(target, markov_head_type=head)
    batch = padded_batch()
    vocabulary = torch.arange(0, VOCAB, 3)  # about two thirds of the labels fall outside
    _, full_output, blocks = seeded_loss(draft, target, batch)
    full_target = draft.compute_logits(
        run_target(target, batch["input_ids"], batch["attention_mask"], draft.config.target_layer_ids)[1]
    )
    draft.set_draft_vocabulary(vocabulary)
    restricted, output, same_blocks = seeded_loss(draft, target, batch)
    assert torch.equal(same_blocks.labels, blocks.labels)
    assert output.logits.shape[-1] == vocabulary.numel()
    torch.testing.assert_close(output.logits, full_output.logits[..., vocabulary], atol=1e-5, rtol=1e-5)

    target_logits = full_target.gather(
        1, blocks.target_positions.flatten(1).unsqueeze(-1).expand(-1, -1, VOCAB)
    ).view(*blocks.target_positions.shape, VOCAB)[..., vocabulary]
    in_vocabulary = (blocks.labels % 3 == 0) & blocks.valid
    assert in_vocabulary.any() and (blocks.valid & ~in_vocabulary).any()
    expected = dspark_loss(
        full_output.logits[..., vocabulary],
        target_logits,
        torch.where(in_vocabulary, blocks.labels // 3, 0),
        blocks.valid,
        full_output.confidence_logits,
        ce_valid=in_vocabulary,
    )
    for name in ("loss", "ce_loss", "tv_loss", "confidence_loss", "ce_sum", "tv_sum"):
        torch.testing.assert_close(getattr(restricted, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert restricted.ce_count == in_vocabulary.sum() < restricted.num_positions
    assert restricted.metrics["ce"] == pytest.approx((restricted.ce_sum / restricted.ce_count).item())


def test_draft_vocabulary_index(target):
    draft = make_draft(target).set_draft_vocabulary([40, 2, 7])
    index, inside = draft.draft_vocabulary_index(torch.tensor([[2, 7, 40], [3, 41, 0]]))
    assert inside.tolist() == [[True, True, True], [False, False, False]]
    assert index[0].tolist() == [0, 1, 2]
    ids = torch.tensor([5, 6])
    index, inside = draft.set_draft_vocabulary(None).draft_vocabulary_index(ids)
    assert torch.equal(index, ids) and inside.all()


# -- training ----------------------------------------------------------------------------------------------------------


def test_evaluation_after_training_uses_the_updated_draft_vocabulary_rows(tmp_path):
    """Optimizer steps update weights in place without bumping tensor versions, so rows of the Markov head copied
    for an earlier evaluation must not be reused by a later one."""
    target = make_target()
    draft = make_draft(target).set_draft_vocabulary(list(range(0, VOCAB, 2)))
    trainer = DSparkTrainer(
        model=draft,
        args=training_args(tmp_path, max_steps=6, learning_rate=5e-2),
        target_model=target,
        train_dataset=make_dataset(12),
        eval_dataset=make_dataset(6, seed=3),
    )
    trainer.evaluate()  # copies the vocabulary rows of the untrained weights
    trainer.train()
    after_training = trainer.evaluate()["eval_loss"]
    fresh = make_draft(target).set_draft_vocabulary(list(range(0, VOCAB, 2)))
    fresh.load_state_dict(draft.state_dict())
    evaluator = DSparkTrainer(
        model=fresh, args=training_args(tmp_path), target_model=target, eval_dataset=make_dataset(6, seed=3)
    )
    assert after_training == pytest.approx(evaluator.evaluate()["eval_loss"], rel=1e-5)


def test_train_freezes_target_and_logs_metrics(tmp_path):
    target = make_target()
    draft = make_draft(target)
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    before_draft = {k: v.clone() for k, v in draft.state_dict().items()}
    trainer = DSparkTrainer(
        model=draft,
        args=training_args(tmp_path, max_steps=3),
        target_model=target,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(4, seed=1),
    )
    assert all(not p.requires_grad for p in target.parameters())
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in target.parameters()}
    trainer.train()
    for key, value in target.state_dict().items():
        assert torch.equal(value, before_target[key]), key
    assert any(not torch.equal(v, before_draft[k]) for k, v in draft.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for name in ("ce", "tv", "confidence_error", "expected_tau", "acceptance_1", f"acceptance_{BLOCK}"):
        assert name in logs[0], name
    assert 1.0 <= logs[0]["expected_tau"] <= 1 + BLOCK
    metrics = trainer.evaluate()
    for name in (
        "eval_loss",
        "eval_ce",
        "eval_tv",
        "eval_confidence_error",
        "eval_expected_tau",
        "eval_acceptance_1",
    ):
        assert name in metrics and metrics[name] == metrics[name], name
    # Held-out anchors are fixed: evaluating twice gives the same numbers.
    again = trainer.evaluate()
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_checkpoints_hold_only_the_draft_and_resume_exactly(tmp_path):
    dataset = make_dataset(12)

    def run(output_dir, resume=None, max_steps=6):
        target = make_target()
        # A resumed run starts from other weights: they must come from the checkpoint.
        draft = make_draft(target, seed=1 if resume is None else 99)
        trainer = DSparkTrainer(
            model=draft,
            args=training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3),
            target_model=target,
            train_dataset=dataset,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: (h["loss"], h["tv"]) for h in trainer.state.log_history if "loss" in h}

    full = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    weights = load_file(checkpoint / "model.safetensors")
    assert not any(k.startswith(("embed_tokens", "lm_head", "model.")) for k in weights)
    assert set(weights) == set(make_draft(make_target()).state_dict())
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "dspark"
    # The saved draft reloads onto the target.
    reloaded = DSparkDraftModel.from_pretrained(checkpoint, target_model=make_target())
    assert reloaded.config.block_size == BLOCK

    resumed = run(tmp_path / "a", resume=str(checkpoint))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1–3 come from the checkpoint's log history
    for step in (4, 5, 6):
        assert resumed[step][0] == pytest.approx(full[step][0], rel=1e-6, abs=1e-7), step
        assert resumed[step][1] == pytest.approx(full[step][1], rel=1e-6, abs=1e-7), step


def test_gradient_accumulation_and_bf16(tmp_path):
    target = make_target().to(torch.bfloat16)
    draft = make_draft(target).float()
    trainer = DSparkTrainer(
        model=draft,
        args=training_args(tmp_path, max_steps=2, bf16=True, gradient_accumulation_steps=2),
        target_model=target,
        train_dataset=make_dataset(),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(x == x and x < 1e3 for x in losses)
    assert draft.fc.weight.dtype == torch.float32


# -- PEFT ------------------------------------------------------------------------------------------------------------


def test_peft_lora_trains_saves_and_loads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    target = make_target()
    base = make_draft(target)
    base.save_pretrained(tmp_path / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer = DSparkTrainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=3, learning_rate=5e-2),
        target_model=target,
        train_dataset=make_dataset(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()

    batch = padded_batch((0, 3))

    def block_logits(model):
        return seeded_loss(model, target, batch, num_anchors=3)[1].logits

    model.eval()
    adapted = block_logits(model)
    fresh_base = DSparkDraftModel.from_pretrained(tmp_path / "base", target_model=target)
    for key, value in fresh_base.state_dict().items():
        assert torch.equal(value, base_state[key]), key  # the base draft itself never changed
    plain = block_logits(fresh_base)
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    torch.testing.assert_close(block_logits(loaded), adapted, atol=1e-5, rtol=1e-5)
    assert (plain - adapted).abs().max() > 1e-4  # the adapter learned something
    merged = loaded.merge_and_unload()
    assert isinstance(merged, DSparkDraftModel)
    torch.testing.assert_close(block_logits(merged), adapted, atol=1e-5, rtol=1e-5)


# -- CLI -------------------------------------------------------------------------------------------------------------


def test_train_pipeline_saves_reports_and_resumes(tmp_path):
    target = make_target()
    train_dataset, eval_dataset = make_dataset(8), make_dataset(4, seed=2)
    fresh = dict(block_size=BLOCK, markov_rank=8, mask_token_id=MASK, target_layer_ids=[0, 2])
    settings = dict(
        max_steps=2, per_device_train_batch_size=2, num_anchors=3, report_to="none", use_cpu=True,
        disable_tqdm=True, save_steps=2, learning_rate=1e-3, lr_scheduler_type="constant",
    )

    def run(output_dir, max_steps, resume=None):
        return train(
            target, train_dataset, output_dir, eval_dataset=eval_dataset, num_draft_layers=1, draft_config=fresh,
            draft_vocab_size=20, training_args={**settings, "max_steps": max_steps}, resume_from_checkpoint=resume,
        )

    result = run(tmp_path / "out", 2)
    assert isinstance(result, DraftTrainingResult) and result.trainer.state.global_step == 2
    assert {"train_loss", "eval_loss", "eval_expected_tau"} <= set(result.metrics)
    assert result.trainer.args.eval_strategy == "epoch"  # an eval dataset without eval_steps
    assert result.draft.config.num_hidden_layers == 1 and result.draft.config.draft_vocab_size == 20
    assert "Draft vocabulary: 20 tokens" in result.draft.model_card_data.notes
    saved = DSparkDraftModel.from_pretrained(tmp_path / "out", target_model=target)
    for key, value in result.draft.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    for name in ("train_results.json", "eval_results.json", "trainer_state.json", "checkpoint-2"):
        assert (tmp_path / "out" / name).exists(), name

    # Two more steps from the last checkpoint equal four steps in one go; a newer checkpoint left half-written by a
    # killed run is skipped.
    (tmp_path / "out" / "checkpoint-3").mkdir()
    (tmp_path / "out" / "checkpoint-3" / "model.safetensors").write_bytes(b"")
    resumed = run(tmp_path / "out", 4, resume="latest")
    straight = run(tmp_path / "straight", 4)
    assert resumed.trainer.state.global_step == straight.trainer.state.global_step == 4
    for key, value in straight.draft.state_dict().items():
        torch.testing.assert_close(resumed.draft.state_dict()[key], value, msg=key)
    straight.draft.model_card_data.notes = "Trained on a test set.\n\n" + straight.draft.model_card_data.notes
    apply_draft_vocabulary(straight.draft, train_dataset, 12, "a second count")  # replaces the first vocabulary's note
    notes = straight.draft.model_card_data.notes.split("\n\n")
    assert notes[0] == "Trained on a test set." and [n for n in notes if n.startswith("Draft vocabulary:")] == [
        notes[-1]
    ] and "12 tokens" in notes[-1] and "a second count" in notes[-1]


def test_build_training_draft_continues_deepens_and_refuses(tmp_path):
    target = make_target()
    draft = build_training_draft(
        target, num_draft_layers=1, config_overrides=dict(block_size=BLOCK, mask_token_id=MASK), seed=5
    )
    assert draft.config.num_hidden_layers == 1 and draft.config.block_size == BLOCK
    again = build_training_draft(
        target, num_draft_layers=1, config_overrides=dict(block_size=BLOCK, mask_token_id=MASK), seed=5
    )
    for key, value in draft.state_dict().items():  # the seed fixes the initialisation
        assert torch.equal(again.state_dict()[key], value), key
    draft.save_pretrained(tmp_path / "draft")
    deeper = build_training_draft(target, draft=tmp_path / "draft", num_draft_layers=2)
    assert deeper.config.num_hidden_layers == 2
    torch.testing.assert_close(deeper.layers[0].mlp.down_proj.weight, draft.layers[0].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="only configure a fresh draft"):
        build_training_draft(target, draft=tmp_path / "draft", config_overrides={"block_size": 2})
    with pytest.raises(ValueError, match="layers can only be added"):
        build_training_draft(target, draft=deeper, num_draft_layers=1)


def test_load_training_datasets_splits_off_an_eval_fraction(tmp_path):
    make_dataset(8).save_to_disk(str(tmp_path / "data"))
    train_dataset, eval_dataset = load_training_datasets(tmp_path / "data", eval_fraction=0.25, seed=0)
    assert len(train_dataset) == 6 and len(eval_dataset) == 2
    rows = {tuple(r["input_ids"]) for r in train_dataset} | {tuple(r["input_ids"]) for r in eval_dataset}
    assert rows == {tuple(r["input_ids"]) for r in make_dataset(8)}
    assert load_training_datasets(tmp_path / "data")[1] is None


def test_cli_train(tmp_path):
    from dspark_hf.cli import run_command

    target = make_target()
    target.save_pretrained(tmp_path / "target")
    make_dataset(8).save_to_disk(str(tmp_path / "data"))
    config = {
        "block_size": BLOCK,
        "num_draft_layers": 1,
        "markov_rank": 8,
        "mask_token_id": MASK,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "num_anchors": 3,
        "report_to": "none",
        "eval_fraction": 0.25,
        "training_args": {"use_cpu": True, "disable_tqdm": True, "save_strategy": "no"},
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    # The target folder has no tokenizer: not needed for an already tokenized dataset.
    trainer = run_command(
        [
            "train",
            "--config",
            str(tmp_path / "train.json"),
            "--target",
            str(tmp_path / "target"),
            "--data",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "out"),
            "--learning-rate",
            "1e-3",
            "--draft-vocab-size",
            "20",
        ]
    )
    assert trainer.state.global_step == 2
    assert trainer.args.learning_rate == 1e-3
    assert trainer.eval_dataset is not None and len(trainer.eval_dataset) == 2
    saved = DSparkDraftModel.from_pretrained(tmp_path / "out", target_model=target)
    assert saved.config.num_hidden_layers == 1 and saved.config.block_size == BLOCK
    # The vocabulary counts the training split's answers only (not the eval split's) and is saved with the draft.
    train_rows = trainer.train_dataset
    counts = torch.bincount(
        torch.tensor([t for r in train_rows for t, m in zip(r["input_ids"], r["loss_mask"], strict=True) if m]),
        minlength=VOCAB,
    )
    assert saved.config.draft_vocab_size == 20
    assert set(saved.draft_vocab_ids.tolist()) <= set(torch.nonzero(counts).flatten().tolist())
    assert counts[saved.draft_vocab_ids].sum() == counts.sort(descending=True).values[:20].sum()
    assert os.path.exists(tmp_path / "out" / "model.safetensors")

    # --draft with a larger --num-draft-layers continues training a deeper draft; fewer layers are refused.
    continue_arguments = [
        "train", "--config", str(tmp_path / "train.json"), "--target", str(tmp_path / "target"),
        "--data", str(tmp_path / "data"), "--num-draft-layers",
    ]
    deeper = run_command(
        [*continue_arguments, "2", "--draft", str(tmp_path / "out"), "--output-dir", str(tmp_path / "deeper")]
    )
    assert deeper.state.global_step == 2
    deeper_saved = DSparkDraftModel.from_pretrained(tmp_path / "deeper", target_model=target)
    assert deeper_saved.config.num_hidden_layers == 2 and len(deeper_saved.layers) == 2
    assert deeper_saved.config.draft_vocab_size == 20
    assert deeper_saved.layers[1].self_attn.o_proj.weight.abs().sum() > 0  # trained away from its zero start
    with pytest.raises(SystemExit, match="only be added"):
        run_command(
            [*continue_arguments, "1", "--draft", str(tmp_path / "deeper"), "--output-dir", str(tmp_path / "shallow")]
        )


def test_cli_train_checks_local_inputs_before_loading_the_target(tmp_path):
    from dspark_hf.cli import run_command

    arguments = ["train", "--target", str(tmp_path / "no-target"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--data .* does not exist"):
        run_command([*arguments, "--data", str(tmp_path / "no-data")])
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(FileNotFoundError, match="draft path"):
        run_command([*arguments, "--data", str(tmp_path / "data.jsonl"), "--draft", str(tmp_path / "no-draft")])


def test_cli_train_rejects_an_empty_draft_vocabulary(tmp_path):
    from dspark_hf.cli import run_command

    arguments = ["train", "--target", "t", "--data", "d", "--output-dir", str(tmp_path), "--draft-vocab-size", "0"]
    with pytest.raises(SystemExit, match="--draft-vocab-size must be a positive number"):
        run_command(arguments)
