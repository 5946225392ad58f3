"""Ships a trained, calibrated draft as the package's built-in default (`src/dspark_hf/default_draft/`).

The draft is stored in bf16 safetensors with its STS temperatures; its model card records the training run, the τ
table measured by `tau_table.py` (greedy mode) and the calibration of `dspark-hf calibrate`. `dspark-hf demo`
loads it.

    python benchmarks/ship_default_draft.py --draft runs/calibrated/dspark_g4/draft --tau-table \
        benchmarks/results/tau_table.json --tau-name dspark_g4 --training-run runs/train/dspark_g4 \
        --training-data "396 SmolLM2-regenerated conversations (benchmarks/configs/prepare_smollm2_400.json)"
"""

import argparse
import json
from pathlib import Path

import torch

from dspark_hf import DSparkDraftModel
from dspark_hf.default_draft import DEFAULT_DRAFT_DIR
from dspark_hf.targets import load_target


def _draft_files(folder: Path) -> list[Path]:
    """The files of a saved draft in `folder`, leaving out Python sources (and their caches)."""
    return [p for p in folder.iterdir() if p.is_file() and p.suffix != ".py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", required=True, help="Calibrated draft folder (dspark-hf calibrate --out …/draft).")
    parser.add_argument("--tau-table", type=Path, help="tau_table.py JSON whose greedy τ goes into the model card.")
    parser.add_argument("--tau-name", help="The draft's name in the τ table.")
    parser.add_argument("--training-run", type=Path, help="Training output dir (trainer_state.json: steps, seed).")
    parser.add_argument("--training-data", help="One line describing the training data.")
    parser.add_argument("--output", type=Path, default=DEFAULT_DRAFT_DIR)
    args = parser.parse_args(argv)

    target, _ = load_target("smollm2", dtype="bfloat16")
    draft = DSparkDraftModel.from_pretrained(args.draft, target_model=target, dtype=torch.bfloat16)
    if draft.config.calibration_temperatures is None:
        raise SystemExit(f"{args.draft} is not calibrated: run `dspark-hf calibrate` first.")
    card = draft.model_card_data
    card.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if args.training_data:
        card.training_data = args.training_data
    if args.training_run:
        state = json.loads((args.training_run / "trainer_state.json").read_text())
        card.training_steps = state["global_step"]
        config = args.training_run / "training_args.bin"
        if config.exists():
            card.seed = torch.load(config, weights_only=False).seed
    if args.tau_table:
        table = json.loads(args.tau_table.read_text())
        greedy = table["results"][args.tau_name]["greedy"]
        settings = table["settings"]
        card.add_evaluation(
            greedy["datasets"],
            do_sample=False,
            max_new_tokens=settings["max_new_tokens"],
            prompts_per_dataset=settings["limit"],
            source=f"benchmarks/results/{args.tau_table.name}",
        )
    if args.output.exists():  # replace the draft's files only: the folder is also the package's `default_draft`
        for path in _draft_files(args.output):
            path.unlink()
    draft.save_pretrained(args.output)
    size = sum(p.stat().st_size for p in _draft_files(args.output)) / 2**20
    print(f"Shipped {args.draft} to {args.output} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
