"""The training recipes in examples/recipes/ build and train as written (on a tiny target, for two steps)."""

import json
from pathlib import Path

import datasets
import torch
from conftest import make_target

from dspark_hf import DSparkDraftModel
from dspark_hf.cli import run_command

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


def test_reference_recipe_builds_the_papers_draft_and_trains_two_steps(tmp_path):
    recipe = RECIPES / "dspark_qwen3_4b_reference.json"
    settings = json.loads(recipe.read_text())
    target = make_target("qwen3", vocab_size=64, num_layers=4)
    target.save_pretrained(tmp_path / "target")
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 63, (24,), generator=generator).tolist() for _ in range(4)]
    datasets.Dataset.from_dict({"input_ids": rows, "loss_mask": [[0] * 6 + [1] * 18] * 4}).save_to_disk(
        str(tmp_path / "data")
    )
    before = {name: p.clone() for name, p in target.named_parameters()}
    # Only what a tiny target forces changes: the target, its layers and mask token, the data, the length of the run.
    trainer = run_command([
        "train", "--config", str(recipe), "--target", str(tmp_path / "target"), "--target-dtype", "float32",
        "--target-layer-ids", "0,1,2", "--mask-token-id", "63", "--data", str(tmp_path / "data"),
        "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
        "--training-args", json.dumps({"use_cpu": True, "disable_tqdm": True, "save_strategy": "no"}),
    ])
    draft = trainer.draft
    assert draft.config.num_hidden_layers == settings["num_draft_layers"] == 5
    assert draft.config.block_size == 7 and trainer.num_anchors == settings["num_anchors"] == 512
    assert (draft.config.markov_head_type, draft.config.markov_rank, draft.config.confidence_head) == ("markov", 256, True)
    assert (draft.config.ce_loss_weight, draft.config.tv_loss_weight, draft.config.confidence_loss_weight) == (0.1, 0.9, 1.0)
    assert draft.config.loss_position_decay == 4.0
    args = trainer.args
    assert (args.learning_rate, args.warmup_steps, args.lr_scheduler_type.value) == (6e-4, 0.04, "cosine")
    assert args.bf16 and args.gradient_accumulation_steps == 64 and args.per_device_train_batch_size == 1
    assert (args.num_train_epochs, args.weight_decay, args.max_grad_norm) == (10, 0.0, 1.0)
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    assert all(torch.equal(before[name], p) for name, p in target.named_parameters())  # the target stays frozen
    saved = DSparkDraftModel.from_pretrained(tmp_path / "out", target_model=trainer.target_model)
    assert saved.config.block_size == 7 and saved.config.num_hidden_layers == 5
