"""Offline target cache: same loss as online training, resumable build, clear errors, trainer never runs the target."""

import os

import pytest
import torch
from conftest import make_target
from test_training_trainer import BLOCK, MASK, VOCAB, make_dataset, make_draft, training_args

from dspark_hf.training import (
    DSparkDataCollator,
    DSparkTrainer,
    TargetCacheDataset,
    build_target_cache,
    compute_dspark_loss,
    load_target_cache_info,
)


@pytest.fixture(scope="module")
def target():
    return make_target("llama", vocab_size=VOCAB, hidden_size=32, seed=0, pad_token_id=0)


def build(target, dataset, path, **kwargs):
    settings = dict(batch_size=3, shard_size=2, dtype=torch.float32, progress=False)
    settings.update(kwargs)
    return build_target_cache(target, dataset, [0, 2], path, **settings)


def test_cached_loss_equals_online_loss(target, tmp_path):
    dataset = make_dataset(5)
    build(target, dataset, tmp_path)
    cached = TargetCacheDataset(dataset, tmp_path, target_layer_ids=[0, 2])
    collator = DSparkDataCollator(pad_token_id=0)
    draft = make_draft(target)
    online_batch = collator([dataset[i] for i in (1, 4)])
    cached_batch = collator([cached[i] for i in (1, 4)])
    assert cached_batch["target_features"].shape == (*online_batch["input_ids"].shape, 2 * 32)
    losses = []
    for batch in (online_batch, cached_batch):
        loss, _, _ = compute_dspark_loss(
            draft,
            target,
            batch["input_ids"],
            batch["loss_mask"],
            batch["attention_mask"],
            num_anchors=4,
            generator=torch.Generator().manual_seed(3),
            target_features=batch.get("target_features"),
            target_final_hidden=batch.get("target_final_hidden"),
        )
        losses.append(loss)
    torch.testing.assert_close(losses[0].loss, losses[1].loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[0].tv_sum, losses[1].tv_sum, atol=1e-5, rtol=1e-5)


def test_build_resumes_from_finished_shards(target, tmp_path):
    dataset = make_dataset(5)
    build(target, dataset, tmp_path)
    info = load_target_cache_info(tmp_path)
    assert info["finished_shards"] == [0, 1, 2]
    kept = tmp_path / "shard-00000.safetensors"
    kept_mtime = os.stat(kept).st_mtime_ns
    # Simulate a build killed before its last shard.
    (tmp_path / "shard-00002.safetensors").unlink()
    info["finished_shards"] = [0, 1]
    (tmp_path / "target_cache.json").write_text(__import__("json").dumps(info))
    with pytest.raises(ValueError, match="incomplete"):
        TargetCacheDataset(dataset, tmp_path)
    build(target, dataset, tmp_path)
    assert os.stat(kept).st_mtime_ns == kept_mtime
    assert load_target_cache_info(tmp_path)["finished_shards"] == [0, 1, 2]
    assert TargetCacheDataset(dataset, tmp_path)[4]["target_features"].shape[0] == len(dataset[4]["input_ids"])


def test_mismatches_are_refused(target, tmp_path):
    dataset = make_dataset(4)
    build(target, dataset, tmp_path)
    with pytest.raises(ValueError, match="different data"):
        TargetCacheDataset(make_dataset(4, seed=1), tmp_path)
    with pytest.raises(ValueError, match="config.target_layer_ids"):
        TargetCacheDataset(dataset, tmp_path, target_layer_ids=[1, 2])
    with pytest.raises(ValueError, match="different settings or data"):
        build(target, make_dataset(4, seed=1), tmp_path)
    with pytest.raises(FileNotFoundError, match="cache-features"):
        TargetCacheDataset(dataset, tmp_path / "missing")
    with pytest.raises(ValueError, match="both target_features and target_final_hidden"):
        batch = DSparkDataCollator(pad_token_id=0)([TargetCacheDataset(dataset, tmp_path)[0]])
        compute_dspark_loss(
            make_draft(target),
            target,
            batch["input_ids"],
            batch["loss_mask"],
            target_features=batch["target_features"],
        )


def test_trainer_on_a_cache_never_runs_the_target(target, tmp_path):
    dataset = make_dataset(8)
    build(target, dataset, tmp_path / "cache")
    train, held_out = TargetCacheDataset(dataset, tmp_path / "cache").split(0.25, seed=0)
    assert sorted(train.indices + held_out.indices) == list(range(8)) and len(held_out) == 2
    draft = make_draft(target)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    trainer = DSparkTrainer(
        model=draft,
        args=training_args(tmp_path / "out", max_steps=3),
        target_model=target,
        train_dataset=train,
        eval_dataset=held_out,
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the target ran although its features are cached")

    target.forward = refuse
    try:
        trainer.train()
        metrics = trainer.evaluate()
    finally:
        del target.forward
    assert any(not torch.equal(v, before[k]) for k, v in draft.state_dict().items())
    assert 1.0 <= metrics["eval_expected_tau"] <= 1 + BLOCK
    assert MASK == draft.config.mask_token_id


def test_cli_cache_features_then_train_on_the_cache(target, tmp_path):
    from dspark_hf.cli import run_command

    target.save_pretrained(tmp_path / "target")
    make_dataset(8).save_to_disk(str(tmp_path / "data"))
    common = ["--target", str(tmp_path / "target"), "--data", str(tmp_path / "data")]
    run_command(
        ["cache-features", *common, "--target-layer-ids", "0,2", "--shard-size", "3", "--no-progress",
         "--output", str(tmp_path / "cache")]
    )
    assert load_target_cache_info(tmp_path / "cache")["finished_shards"] == [0, 1, 2]
    train = [
        "train", *common, "--target-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
        "--block-size", str(BLOCK), "--num-draft-layers", "1", "--markov-rank", "8", "--mask-token-id", str(MASK),
        "--max-steps", "2", "--per-device-train-batch-size", "2", "--num-anchors", "3", "--report-to", "none",
        "--eval-fraction", "0.25", "--training-args", '{"use_cpu": true, "disable_tqdm": true, "save_strategy": "no"}',
    ]
    trainer = run_command([*train, "--target-layer-ids", "0,2"])
    assert isinstance(trainer.train_dataset, TargetCacheDataset) and len(trainer.eval_dataset) == 2
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="config.target_layer_ids"):
        run_command([*train, "--target-layer-ids", "1,2"])
