"""Training EAGLE-3 drafts with the library's trainer (`Eagle3Trainer` on the shared `DraftTrainer`): the loss falls,
the target stays untouched, cached features equal the target's forward, checkpoints resume, PEFT and bf16, the
`train()` pipeline and `dspark-hf train --draft-type eagle3`, and the refusal of the other family's options.

Also runnable as `python -m torch.distributed.run --nproc_per_node 2 tests/test_training_eagle3.py OUT` (used by
`test_ddp_ranks_train_the_same_eagle3_draft`)."""

import json
import os
import sys

import datasets
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_target as make_tiny_target  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dspark_hf import DSparkDraftModel, Eagle3DraftModel  # noqa: E402
from dspark_hf.training import (  # noqa: E402
    DSparkDataCollator,
    DSparkTrainer,
    Eagle3Trainer,
    Eagle3TrainingArguments,
    TargetCacheDataset,
    build_target_cache,
    build_training_draft,
    compute_eagle3_loss,
    eagle3_loss,
    run_target,
    train,
)

VOCAB = 96
LAYERS = [0, 1, 2]
TTT = 3


def make_target(seed: int = 0, num_layers: int = 4):
    # A wide initialisation makes the target's next-token distributions peaked, so there is something to learn.
    return make_tiny_target(
        "llama", vocab_size=VOCAB, hidden_size=32, num_layers=num_layers, seed=seed, pad_token_id=0,
        initializer_range=0.5,
    )


def make_draft(target, seed: int = 1, **overrides) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    return Eagle3DraftModel.from_target(target, **{"target_layer_ids": LAYERS, "ttt_length": TTT, **overrides})


def make_dataset(num: int = 4, length: int = 16, seed: int = 0, ragged: bool = False) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num):
        n = length - (3 * i) % 7 if ragged else length
        ids = torch.randint(1, VOCAB - 1, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 3 + [1] * (n - 3)})
    return datasets.Dataset.from_list(rows)


def training_args(output_dir, **overrides) -> Eagle3TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=7,
    )
    settings.update(overrides)
    return Eagle3TrainingArguments(**settings)


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def target():
    return make_target()


# -- the loss step ---------------------------------------------------------------------------------------------------


def test_the_loss_step_is_eagle3_loss_of_the_ttt_forward(target):
    """`compute_eagle3_loss` = target forward → fused features and LM-head soft targets → TTT → `eagle3_loss`."""
    draft = make_draft(target).eval()
    batch = DSparkDataCollator(pad_token_id=0)([make_dataset(3, ragged=True)[i] for i in range(3)])
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert mask.sum(-1).unique().numel() > 1  # rows are padded
    with torch.no_grad():
        result, output = compute_eagle3_loss(draft, target, ids, loss_mask, mask)
        hidden = target(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        features = torch.cat([hidden[i + 1] for i in LAYERS], dim=-1)
        steps = draft.ttt_forward(ids, features, mask)
        logits = target(ids, attention_mask=mask).logits
        expected = eagle3_loss(steps.logits, logits, loss_mask, mask, step_loss_decay=draft.config.step_loss_decay)
    assert len(output.logits) == TTT
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.step_losses, expected.step_losses, rtol=1e-5, atol=1e-6)
    metrics = result.metrics
    assert {f"ce_{k}" for k in range(1, TTT + 1)} <= set(metrics)
    assert 1.0 <= metrics["expected_tau"] <= 1 + TTT and 1.0 <= metrics["tau_greedy"] <= 1 + TTT


def test_draft_vocabulary_loss_restricts_both_distributions(target):
    draft = make_draft(target).eval()
    draft.set_draft_vocabulary(list(range(0, VOCAB, 2)))
    batch = DSparkDataCollator(pad_token_id=0)([make_dataset(2)[i] for i in range(2)])
    with torch.no_grad():
        result, output = compute_eagle3_loss(draft, target, batch["input_ids"], batch["loss_mask"])
        logits = target(batch["input_ids"]).logits
        full_vocab_steps = draft.ttt_forward(
            batch["input_ids"], run_target(target, batch["input_ids"], None, LAYERS)[0], draft_vocabulary=False
        )
        restricted = [s[..., draft.draft_vocab_ids] for s in full_vocab_steps.logits]
        expected = eagle3_loss(restricted, logits, batch["loss_mask"], draft_vocab_ids=draft.draft_vocab_ids)
    assert output.logits[0].shape[-1] == VOCAB // 2
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-6)


# -- training --------------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_leaves_the_target_untouched(tmp_path):
    target = make_target()
    draft = make_draft(target)
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    before_draft = {k: v.clone() for k, v in draft.state_dict().items()}
    trainer = Eagle3Trainer(
        model=draft,
        args=training_args(tmp_path, max_steps=30),
        target_model=target,
        train_dataset=make_dataset(),  # one batch, seen every step
        eval_dataset=make_dataset(4, seed=1),
    )
    assert all(not p.requires_grad for p in target.parameters())
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in target.parameters()}
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 30
    assert logged[30] < 0.8 * logged[1], logged
    for key, value in target.state_dict().items():
        assert torch.equal(value, before_target[key]), key
    assert any(not torch.equal(v, before_draft[k]) for k, v in draft.state_dict().items())
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    for name in ("ce_1", f"ce_{TTT}", "accuracy_1", f"acceptance_{TTT}", "tau_greedy", "expected_tau"):
        assert name in last, name
    first = [h for h in trainer.state.log_history if "loss" in h][0]
    assert last["accuracy_1"] > first["accuracy_1"]
    metrics = trainer.evaluate()
    for name in ("eval_loss", "eval_ce_1", "eval_accuracy_1", "eval_acceptance_1", "eval_expected_tau"):
        assert name in metrics and metrics[name] == metrics[name], name
    assert trainer.evaluate()["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_cached_features_give_the_loss_of_the_target_forward(tmp_path, target):
    dataset = make_dataset(6, ragged=True)
    build_target_cache(target, dataset, LAYERS, tmp_path / "cache", batch_size=4, shard_size=4, dtype=torch.float32,
                       progress=False)
    cached = TargetCacheDataset(dataset, tmp_path / "cache", target_layer_ids=LAYERS)
    collator = DSparkDataCollator(pad_token_id=0)
    online_batch = collator([dataset[i] for i in (1, 2, 4)])
    cached_batch = collator([cached[i] for i in (1, 2, 4)])
    assert cached_batch["target_features"].shape[-1] == len(LAYERS) * 32
    draft = make_draft(target).eval()
    with torch.no_grad():
        online, _ = compute_eagle3_loss(
            draft, target, online_batch["input_ids"], online_batch["loss_mask"], online_batch["attention_mask"]
        )
        offline, _ = compute_eagle3_loss(
            draft, target, cached_batch["input_ids"], cached_batch["loss_mask"], cached_batch["attention_mask"],
            target_features=cached_batch["target_features"], target_final_hidden=cached_batch["target_final_hidden"],
        )
    torch.testing.assert_close(offline.loss, online.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(offline.step_losses, online.step_losses, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="both target_features and target_final_hidden"):
        compute_eagle3_loss(draft, target, cached_batch["input_ids"], cached_batch["loss_mask"],
                            target_features=cached_batch["target_features"])

    # The trainer takes either dataset and logs the same losses.
    def run(train_dataset, output_dir):
        trainer = Eagle3Trainer(model=make_draft(make_target()), target_model=make_target(), train_dataset=train_dataset,
                                args=training_args(output_dir, max_steps=3, per_device_train_batch_size=3))
        trainer.train()
        return losses(trainer)

    online_losses, cached_losses = run(dataset, tmp_path / "a"), run(cached, tmp_path / "b")
    assert sorted(online_losses) == [1, 2, 3]
    for step, value in online_losses.items():
        assert cached_losses[step] == pytest.approx(value, rel=1e-5), step


def test_checkpoints_hold_only_the_draft_and_resume(tmp_path):
    dataset = make_dataset(8, ragged=True)

    def run(resume=None):
        target = make_target()
        draft = make_draft(target, seed=1 if resume is None else 99)  # a resumed run's weights come from the checkpoint
        trainer = Eagle3Trainer(
            model=draft,
            args=training_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2,
                               per_device_train_batch_size=2),
            target_model=target,
            train_dataset=dataset,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in weights)
    assert set(weights) == set(make_draft(make_target()).state_dict())
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "eagle3"
    reloaded = Eagle3DraftModel.from_pretrained(checkpoint, target_model=make_target())
    assert reloaded.config.ttt_length == TTT and reloaded.config.target_layer_ids == LAYERS

    resumed = run(resume=str(checkpoint))
    assert resumed.state.global_step == 4
    assert sorted(losses(resumed)) == [1, 2, 3, 4]  # steps 1–2 come from the checkpoint's log history
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(losses(full)[step], rel=1e-5), step
    for key, value in full.draft.state_dict().items():
        torch.testing.assert_close(resumed.draft.state_dict()[key], value, msg=key)


def test_peft_lora_and_bf16_mixed_precision(tmp_path):
    from peft import LoraConfig, get_peft_model

    target = make_target()
    base = make_draft(target)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = Eagle3Trainer(model=model, args=training_args(tmp_path / "lora", max_steps=3), target_model=target,
                            train_dataset=make_dataset())
    trainer.train()
    changed = {n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert changed and losses(trainer)[3] < losses(trainer)[1]
    for name, value in base.state_dict().items():  # only the adapter trained
        if "lora_" not in name and "base_layer" not in name:
            assert torch.equal(value, base_state[name]), name
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

    # bf16 autocast: accelerate gives the draft a mixed-precision forward; the TTT forward routed through the
    # wrappers runs under the same autocast and leaves that forward in place.
    target = make_target()
    draft = make_draft(target).float()
    trainer = Eagle3Trainer(model=draft, args=training_args(tmp_path / "bf16", max_steps=2, bf16=True,
                                                            gradient_accumulation_steps=2),
                            target_model=target, train_dataset=make_dataset(8))
    trainer.train()
    assert len(losses(trainer)) == 2 and all(x == x for x in losses(trainer).values())
    assert draft.fc.weight.dtype == torch.float32


def test_trainers_refuse_the_other_family(tmp_path, target):
    with pytest.raises(TypeError, match="DSparkTrainer trains DSparkDraftModel drafts.*Eagle3Trainer"):
        DSparkTrainer(model=make_draft(target), target_model=target, args=training_args(tmp_path))
    dspark = DSparkDraftModel.from_target(target, block_size=4, num_hidden_layers=1, target_layer_ids=[0, 2])
    with pytest.raises(TypeError, match="Eagle3Trainer trains Eagle3DraftModel drafts"):
        Eagle3Trainer(model=dspark, target_model=target, args=training_args(tmp_path))


# -- pipeline and command line ---------------------------------------------------------------------------------------


def test_train_pipeline_builds_trains_saves_and_continues(tmp_path):
    target = make_target(num_layers=6)
    fresh = build_training_draft(target, draft_type="eagle3", seed=3)
    assert isinstance(fresh, Eagle3DraftModel)
    assert fresh.config.target_layer_ids == [1, 2, 3] and fresh.config.ttt_length == 7  # low, middle, high
    settings = dict(max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True, disable_tqdm=True,
                    save_steps=2, learning_rate=1e-3)
    result = train(
        target, make_dataset(8), tmp_path / "out", eval_dataset=make_dataset(2, seed=2), draft_type="eagle3",
        draft_config={"ttt_length": 2, "step_loss_decay": 0.5}, draft_vocab_size=30, training_args=settings,
    )
    assert isinstance(result.trainer, Eagle3Trainer) and result.trainer.state.global_step == 2
    assert {"train_loss", "eval_loss", "eval_expected_tau", "eval_ce_2"} <= set(result.metrics)
    saved = Eagle3DraftModel.from_pretrained(tmp_path / "out", target_model=target)
    assert saved.config.ttt_length == 2 and saved.config.step_loss_decay == 0.5 and saved.config.draft_vocab_size == 30
    for key, value in result.draft.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key

    # A saved EAGLE-3 draft continues as one (its family is read from the folder, either layout).
    saved.save_pretrained(tmp_path / "reference", layout="deepspec")
    for folder in (tmp_path / "out", tmp_path / "reference"):
        again = train(target, make_dataset(8), tmp_path / "again", draft=folder, training_args=settings)
        assert isinstance(again.trainer, Eagle3Trainer) and again.draft.config.ttt_length == 2
    with pytest.raises(ValueError, match="is a eagle3 draft"):
        build_training_draft(target, draft=tmp_path / "out", draft_type="dspark")
    with pytest.raises(ValueError, match="cannot be deepened"):
        build_training_draft(target, draft=tmp_path / "out", num_draft_layers=2)
    with pytest.raises(ValueError, match="num_anchors is a DSpark training option"):
        train(target, make_dataset(8), tmp_path / "x", draft_type="eagle3", training_args={**settings, "num_anchors": 4})
    with pytest.raises(ValueError, match=r"Unknown Eagle3DraftConfig field\(s\) \['block_size'\]"):
        build_training_draft(target, draft_type="eagle3", config_overrides={"block_size": 4})


def test_cli_train_eagle3(tmp_path):
    from dspark_hf.cli import main

    target = make_target(num_layers=6)
    target.save_pretrained(tmp_path / "target")
    make_dataset(8, ragged=True).save_to_disk(str(tmp_path / "data"))
    config = {
        "draft_type": "eagle3",
        "ttt_length": 2,
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "eval_fraction": 0.25,
        "training_args": {"use_cpu": True, "disable_tqdm": True, "save_strategy": "no"},
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    status = main([
        "train", "--config", str(tmp_path / "train.json"), "--target", str(tmp_path / "target"),
        "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), "--step-loss-decay", "0.6",
        "--target-layer-ids", "0,2", "--learning-rate", "1e-3",
    ])
    assert status == 0
    saved = Eagle3DraftModel.from_pretrained(tmp_path / "out", target_model=target)
    assert saved.config.ttt_length == 2 and saved.config.step_loss_decay == 0.6
    assert saved.config.target_layer_ids == [0, 2] and saved.config.num_hidden_layers == 1
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    eval_results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "eval_expected_tau" in eval_results and "eval_ce_2" in eval_results

    # Continuing the saved draft: its family comes from the folder, no --draft-type needed.
    status = main([
        "train", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data"), "--draft",
        str(tmp_path / "out"), "--output-dir", str(tmp_path / "more"), "--max-steps", "1", "--report-to", "none",
        "--training-args", json.dumps({"use_cpu": True, "disable_tqdm": True, "save_strategy": "no"}),
    ])
    assert status == 0 and (tmp_path / "more" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "arguments, refused",
    [
        (["--draft-type", "eagle3", "--block-size", "4"], "--block-size only configures DSpark drafts"),
        (["--draft-type", "eagle3", "--num-anchors", "4", "--no-confidence-head"], "--no-confidence-head, --num-anchors"),
        (["--draft-type", "eagle3", "--markov-head-type", "none"], "--markov-head-type"),
        (["--ttt-length", "3"], "--ttt-length only configures EAGLE-3 drafts.*pass --draft-type eagle3"),
        (["--draft-type", "dspark", "--step-loss-decay", "0.5"], "--step-loss-decay"),
    ],
)
def test_cli_refuses_the_other_familys_options(tmp_path, arguments, refused):
    from dspark_hf.cli import run_command

    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    common = ["train", "--target", str(tmp_path / "no-target"), "--data", str(tmp_path / "data.jsonl"),
              "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=refused):  # before the target loads
        run_command([*common, *arguments])


def test_cli_refuses_dspark_options_from_a_config_file(tmp_path):
    from dspark_hf.cli import run_command

    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "train.json").write_text(json.dumps({"draft_type": "eagle3", "block_size": 8, "num_anchors": 4}))
    arguments = ["train", "--config", str(tmp_path / "train.json"), "--target", str(tmp_path / "no-target"),
                 "--data", str(tmp_path / "data.jsonl"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--block-size, --num-anchors only configure DSpark drafts"):
        run_command(arguments)
