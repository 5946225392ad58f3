"""Trains a tiny draft for three steps in each process of a `torch.distributed.run` launch (DDP over gloo, CPU).

Run by tests/test_distributed.py: `python -m torch.distributed.run --nproc_per_node 2 distributed_train.py OUT
FAMILY` (FAMILY: dspark or eagle3). Each rank writes its final draft weights to OUT/rank<r>.safetensors and what it
saw to OUT/rank<r>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dspark_hf.training import DSparkTrainer, Eagle3Trainer  # noqa: E402


def make_trainer(out: Path, family: str):
    """`(target, draft, trainer)` for three steps, built with the family's own test helpers."""
    if family == "dspark":
        import test_training_trainer as helpers

        target = helpers.make_target()
        draft = helpers.make_draft(target)
        trainer = DSparkTrainer(model=draft, target_model=target, args=helpers.training_args(out, max_steps=3),
                                train_dataset=helpers.make_dataset(16))
    else:
        import test_training_eagle3 as helpers

        target = helpers.make_target()
        draft = helpers.make_draft(target)
        trainer = Eagle3Trainer(model=draft, target_model=target, train_dataset=helpers.make_dataset(8, ragged=True),
                                args=helpers.training_args(out, max_steps=3, per_device_train_batch_size=2))
    return target, draft, trainer


def main(out: Path, family: str) -> None:
    target, draft, trainer = make_trainer(out, family)
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    draft_before = {k: v.clone() for k, v in draft.state_dict().items()}
    trainer.train()
    rank = trainer.args.process_index
    state = {k: v.detach().contiguous() for k, v in draft.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    report = {
        "world_size": trainer.args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "expected_tau": [h["expected_tau"] for h in trainer.state.log_history if "expected_tau" in h],
        "target_unchanged": all(torch.equal(v, target_before[k]) for k, v in target.state_dict().items()),
        "draft_changed": any(not torch.equal(v, draft_before[k]) for k, v in state.items()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # Shut the process group down before exit: a gloo thread left running can abort the process at teardown.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
