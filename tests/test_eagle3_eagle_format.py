"""The EAGLE-3 checkpoint layout of EAGLE (SafeAILab) and SpecForge (`dspark_hf.formats.eagle`) against checkpoints
and outputs written by those projects' own code (`tests/fixtures/eagle3_eagle/`, README there).

Import: both checkpoints load as Llama-layer drafts with their own LM head and draft vocabulary (`d2t` / `t2d`),
read the target layers EAGLE's target captures (SafeAILab) or their config names (SpecForge), and give EAGLE's
decoding rounds (context, greedy chain through `d2t`) and SpecForge's training-time-test logits of every step. Export:
a loaded checkpoint saved again has exactly their tensors and config entries; hf ↔ eagle round trips; refusals name
the problem; a loaded draft keeps greedy `generate()` and the engine identical to the target's.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_target
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dspark_hf import DSparkEngine, Eagle3DraftModel, SamplingParams
from dspark_hf.speculative.eagle3_proposer import eagle3_draft_chain
from dspark_hf.training import compute_eagle3_loss, draft_type_of

FIXTURES = Path(__file__).parent / "fixtures" / "eagle3_eagle"
VARIANTS = ("safeailab", "specforge")
WEIGHTS = {"safeailab": "pytorch_model.bin", "specforge": "model.safetensors"}
LAYERS = {"safeailab": [1, 3, 4], "specforge": [1, 3, 5]}  # EAGLE's default for 8 layers; named by the config
ATOL = 1e-5  # measured: ≤ 1.5e-6 against both projects' float32 outputs


def fixture(variant: str) -> Path:
    return FIXTURES / variant


def load_io(variant: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixture(variant) / "io.safetensors"))


def stored_weights(variant: str) -> dict[str, torch.Tensor]:
    path = fixture(variant) / WEIGHTS[variant]
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def target():
    return AutoModelForCausalLM.from_pretrained(FIXTURES / "target", dtype=torch.float32).eval()


def load_draft(variant: str, target=None, folder: Path | None = None, **kwargs) -> Eagle3DraftModel:
    return Eagle3DraftModel.from_pretrained(folder or fixture(variant), target_model=target, dtype=torch.float32,
                                            **kwargs)


def copy_fixture(variant: str, tmp_path: Path, config: dict | None = None, weights=None) -> Path:
    """A copy of a fixture with config.json entries changed (None deletes one) and its weights edited by `weights`
    (a function of the state dict)."""
    folder = tmp_path / variant
    shutil.copytree(fixture(variant), folder)
    flat = json.loads((folder / "config.json").read_text())
    for name, value in (config or {}).items():
        if value is None:
            flat.pop(name, None)
        else:
            flat[name] = value
    (folder / "config.json").write_text(json.dumps(flat))
    if weights is not None:
        state = weights(stored_weights(variant))
        (folder / WEIGHTS[variant]).unlink()
        save_file(state, str(folder / "model.safetensors"))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_loads_as_a_llama_draft_with_its_own_head_and_vocabulary(variant, target):
    draft = load_draft(variant, target)
    stored = stored_weights(variant)
    config = draft.config
    assert (config.draft_architecture, config.num_hidden_layers, config.use_draft_lm_head) == ("llama", 1, True)
    assert config.target_layer_ids == LAYERS[variant] and config.num_target_layers == 8
    assert config.draft_vocab_size == 64 and draft.draft_lm_head.weight.shape == (64, 48)
    assert not hasattr(draft.layers[0].self_attn.q_norm, "weight")  # Llama attention: no q/k norms
    assert torch.equal(draft.d2t, stored["d2t"]) and torch.equal(draft.t2d, stored["t2d"])
    assert torch.equal(draft.draft_vocab_ids, torch.arange(64) + stored["d2t"])
    assert torch.equal(draft.draft_lm_head.weight, stored["lm_head.weight"].float())
    assert draft.is_attached_to(target) and not draft.training


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_folder_is_recognised_as_an_eagle3_draft(variant):
    """`draft_type_of` (what `dspark-hf train --draft`, the benchmarks and `train()` use to pick the draft family)
    reads these folders as EAGLE-3 drafts, not as DSpark ones."""
    assert draft_type_of(fixture(variant)) == "eagle3"


def test_the_default_target_layers_are_the_ones_eagles_target_captures(target):
    """EAGLE's KV-cache Llama captures the inputs of layers 2, L//2, L−3; from the target's layer count the loader
    derives the layers whose outputs those are, and our target's hidden states there are EAGLE's features."""
    io = load_io("safeailab")
    draft = load_draft("safeailab", target)
    ids = io["r2.input_ids"][:, :-1]
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
    ours = torch.cat([hidden[i + 1] for i in draft.config.target_layer_ids], dim=-1)
    torch.testing.assert_close(ours, io["target_features_all"][:, : ids.shape[1]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_decoding_rounds_are_eagles(attn_implementation, target):
    """EAGLE's two drafting rounds (`Model.topK_genrate` with top_k = 1, a chain of 4): the context step over the
    verified positions, then greedy tokens drawn in the draft vocabulary and mapped to target ids through d2t."""
    io = load_io("safeailab")
    draft = load_draft("safeailab", target, attn_implementation=attn_implementation)
    cache, start = None, 0
    for r in (1, 2):
        key = f"r{r}."
        features, ids = io[key + "features"], io[key + "input_ids"]
        count = features.shape[1]
        with torch.no_grad():
            context = draft.context_step(features, ids[:, start + 1 :], torch.arange(start, start + count)[None], cache)
            logits = draft.compute_logits(context.hidden_states, draft_vocabulary=True)
        cache, start = context.cache, start + count
        assert cache.get_seq_length() == int(io[key + "context_length"])
        torch.testing.assert_close(context.hidden_states, io[key + "context_hidden"], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits, io[key + "context_logits"], atol=ATOL, rtol=0)
        block = eagle3_draft_chain(draft, cache, context.hidden_states[:, -1:], torch.tensor([start]), 4, ids)
        assert torch.equal(block.tokens, io[key + "draft_tokens"])
        step_logits = block.logits[0][:, draft.draft_vocab_ids]
        torch.testing.assert_close(step_logits, io[key + "step_logits"], atol=ATOL, rtol=0)
        outside = torch.ones(draft.config.vocab_size, dtype=torch.bool).index_fill_(0, draft.draft_vocab_ids, False)
        assert torch.isneginf(block.logits[0][:, outside]).all()  # drafted only from the draft vocabulary
        assert cache.get_seq_length() == start  # the chain left the cache as it was


def test_training_time_test_logits_are_specforges(target):
    """SpecForge's `OnlineEagle3Model.forward` (3 TTT steps, a right-padded batch of two) gives, on every real
    position, the logits and hidden states of our `ttt_forward` (whose token shift is their data pipeline's)."""
    io = load_io("specforge")
    draft = load_draft("specforge", target)
    with torch.no_grad():
        output = draft.ttt_forward(io["input_ids"], io["features"], io["attention_mask"], ttt_length=3)
    real = io["attention_mask"].bool()
    for k in range(3):
        torch.testing.assert_close(output.logits[k][real], io["steps.logits"][k][real], atol=ATOL, rtol=0)
        torch.testing.assert_close(output.hidden_states[k][real], io["steps.hidden_states"][k][real], atol=ATOL, rtol=0)
    assert (io["steps.logits"][1] - io["steps.logits"][0])[real].abs().max() > 0.1  # steps really differ


def test_full_vocabulary_logits_are_minus_infinity_outside_the_draft_vocabulary(target):
    draft = load_draft("specforge", target)
    hidden = torch.randn(2, 3, 48)
    with torch.no_grad():
        small, full = draft.compute_logits(hidden, draft_vocabulary=True), draft.compute_logits(hidden)
    assert full.shape == (2, 3, 256)
    assert torch.equal(full[..., draft.draft_vocab_ids], small)
    assert torch.isneginf(full).sum() == 2 * 3 * (256 - 64)


def test_vllm_layer_names_and_target_layer_ids(target, tmp_path):
    """vLLM reads `layers.0.*` as well as `midlayer.*`, and its top-level `eagle_aux_hidden_state_layer_ids` counts
    the layers whose inputs it reads (ours + 1)."""
    folder = copy_fixture(
        "specforge", tmp_path, config={"eagle_config": None, "eagle_aux_hidden_state_layer_ids": [2, 4, 6]},
        weights=lambda state: {k.replace("midlayer.", "layers.0."): v for k, v in state.items()},
    )
    draft, reference = load_draft("specforge", target, folder), load_draft("specforge", target)
    assert draft.config.target_layer_ids == [1, 3, 5]
    features, ids = torch.randn(1, 6, 144), torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ours = draft.context_step(features, ids, torch.arange(6)[None]).logits
        theirs = reference.context_step(features, ids, torch.arange(6)[None]).logits
    assert torch.equal(ours, theirs)


def test_the_training_loss_trains_the_own_head_against_the_targets_distribution(target):
    """`compute_eagle3_loss` (what `Eagle3Trainer` runs) takes the soft targets from the target's LM-head rows of the
    draft vocabulary (`lm_head_logits` stays the target's head) and the draft's logits from its own head."""
    draft = load_draft("specforge", target).train()
    target.requires_grad_(False)  # frozen, as Eagle3Trainer freezes it
    io = load_io("specforge")
    loss, output = compute_eagle3_loss(draft, target, io["input_ids"], io["attention_mask"], io["attention_mask"])
    loss.loss.backward()
    assert output.logits[0].shape == (2, 10, 64)
    assert draft.draft_lm_head.weight.grad.abs().sum() > 0 and draft.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        hidden = target(io["input_ids"], output_hidden_states=True).hidden_states[-1]
        expected = target.lm_head(hidden)[..., draft.draft_vocab_ids]
    torch.testing.assert_close(draft.lm_head_logits(hidden, draft_vocabulary=True), expected)


# ----------------------------------------------------------------------------------------------------------------------
# export and round trips
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_writes_their_tensors_and_config(variant, tmp_path):
    draft = Eagle3DraftModel.from_pretrained(fixture(variant), target_layer_ids=LAYERS[variant])  # stored dtype
    draft.save_pretrained(tmp_path, layout="eagle")
    written, expected = load_file(str(tmp_path / "model.safetensors")), stored_weights(variant)
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    theirs = json.loads((fixture(variant) / "config.json").read_text())
    ours = json.loads((tmp_path / "config.json").read_text())
    # Bookkeeping, and RoPE, which is written as rope_theta / rope_scaling (read by all of them) only.
    skipped = {"transformers_version", "dtype", "rope_parameters"}
    assert {k: (ours.get(k), v) for k, v in theirs.items() if k not in skipped and ours.get(k) != v} == {}
    assert ours["rope_theta"] == 10000.0 and ours["rope_scaling"] is None
    assert ours["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == LAYERS[variant]
    assert ours["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in LAYERS[variant]]
    again = Eagle3DraftModel.from_pretrained(tmp_path)
    assert again.config.to_diff_dict() == draft.config.to_diff_dict()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_and_eagle_layouts_round_trip(variant, target, tmp_path):
    draft = load_draft(variant, target)
    draft.save_pretrained(tmp_path / "hf")
    assert "draft_lm_head.weight" in load_file(str(tmp_path / "hf" / "model.safetensors"))
    from_hf = load_draft(variant, target, tmp_path / "hf")
    from_hf.save_pretrained(tmp_path / "eagle", layout="eagle")
    from_eagle = load_draft(variant, target, tmp_path / "eagle")
    assert from_eagle.config.to_diff_dict() == load_draft(variant, target).config.to_diff_dict()
    features, ids = torch.randn(1, 5, 144), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        logits = [d.context_step(features, ids, torch.arange(5)[None]).logits for d in (draft, from_hf, from_eagle)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_a_draft_using_the_targets_head_exports_its_rows_as_the_lm_head(target, tmp_path):
    """A Llama-design draft built here (target's LM head, a draft vocabulary) is written with the target's rows of
    its vocabulary as `lm_head`: the loaded draft, with its own head, computes the same logits."""
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_target(target, draft_architecture="llama", target_layer_ids=[1, 3, 4]).eval()
    draft.set_draft_vocabulary(range(0, 256, 3))
    draft.save_pretrained(tmp_path, layout="eagle")
    written = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(written["lm_head.weight"], target.lm_head.weight[draft.draft_vocab_ids])
    assert torch.equal(written["d2t"], draft.d2t) and written["t2d"].sum() == 86
    loaded = load_draft("specforge", target, tmp_path)
    features, ids = torch.randn(1, 5, 144), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ours = draft.context_step(features, ids, torch.arange(5)[None], draft_vocabulary=True).logits
        again = loaded.context_step(features, ids, torch.arange(5)[None], draft_vocabulary=True).logits
    torch.testing.assert_close(ours, again, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------------------------------


def _outside_vocabulary(state):
    state["d2t"] = state["d2t"].clone()
    state["d2t"][-1] += 1000
    return state


def _repeated_token(state):
    state["d2t"] = state["d2t"].clone()
    state["d2t"][5] = state["d2t"][4] - 1  # row 5 maps to row 4's token
    return state


def _flip_t2d(state):
    state["t2d"] = state["t2d"].clone()
    state["t2d"][int(state["t2d"].logical_not().nonzero()[0])] = True
    return state


UNREADABLE = {
    "no_d2t": ({}, lambda state: {k: v for k, v in state.items() if k != "d2t"}, r"no d2t buffer.*--vocab-mapping"),
    "t2d_disagrees": ({}, _flip_t2d, r"t2d .*65 tokens marked.* disagrees with d2t.*Rebuild t2d from d2t"),
    "outside_vocabulary": ({}, _outside_vocabulary, r"d2t maps draft index 63 to target token \d+, outside .*256\)"),
    "not_increasing": ({}, _repeated_token, r"d2t maps draft index 5 .*increasing target-id order"),
    "head_rows": ({"draft_vocab_size": 32}, None, r"lm_head.weight has 64 rows but .*draft_vocab_size=32"),
    "two_layers": ({"num_hidden_layers": 2}, None, r"num_hidden_layers=2.*embedding to their first layer only"),
    "norm_before_residual": ({"norm_before_residual": True}, None, r"norm_before_residual=True.*=False only"),
    "fc_norm": ({"fc_norm": True}, None, r"fc_norm=True"),
    "wider_target": ({"target_hidden_size": 64}, None, r"target_hidden_size=64.*hidden_size=48"),
    "vllm_ids_disagree": ({"eagle_aux_hidden_state_layer_ids": [2, 4, 5]}, None, r"two different sets of target"),
    "embedding_layer": ({"eagle_aux_hidden_state_layer_ids": [0, 4, 6], "eagle_config": None}, None, r"id 0 reads"),
    "not_llama": ({"model_type": "qwen3"}, None, r"model_type='qwen3'.*Llama-layer draft"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_a_checkpoint_we_cannot_read_raises_a_clear_error(name, tmp_path):
    changes, weights, message = UNREADABLE[name]
    with pytest.raises(ValueError, match=message):
        Eagle3DraftModel.from_pretrained(copy_fixture("specforge", tmp_path, changes, weights))


def test_the_target_layers_must_be_known_and_fit_fc(target):
    with pytest.raises(ValueError, match=r"does not say which target layers.*target_model=.*target_layer_ids="):
        Eagle3DraftModel.from_pretrained(fixture("safeailab"))
    with pytest.raises(ValueError, match=r"fc.weight reads 144 features = 3 target layers.*\[1, 3\] give 2"):
        Eagle3DraftModel.from_pretrained(fixture("safeailab"), target_layer_ids=[1, 3])


def test_drafts_the_layouts_cannot_hold_are_refused(target, tmp_path):
    qwen3 = Eagle3DraftModel.from_target(target, target_layer_ids=[1, 3, 4])
    with pytest.raises(ValueError, match=r"no q_norm / k_norm.*draft_architecture='llama'"):
        qwen3.save_pretrained(tmp_path, layout="eagle")
    own_head = load_draft("specforge", target)
    with pytest.raises(ValueError, match=r"has its own \(use_draft_lm_head\).*layout='eagle'"):
        own_head.save_pretrained(tmp_path, layout="deepspec")
    with pytest.raises(ValueError, match=r"own LM head has 64 rows.*cannot draft over 10 tokens"):
        own_head.set_draft_vocabulary(range(10))


# ----------------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_with_a_loaded_draft_is_the_targets(variant, target):
    """On the fixture target and on a tiny target built from a config (same geometry, other weights)."""
    other = make_target("llama", vocab_size=256, hidden_size=48, num_layers=8, seed=3)
    for model in (target, other):
        draft = load_draft(variant, model)
        for seed, gamma in ((0, 1), (1, 3), (2, 5)):
            prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))
            plain = model.generate(prompt, max_new_tokens=16, do_sample=False)
            drafted = model.generate(prompt, max_new_tokens=16, do_sample=False, assistant_model=draft,
                                     max_draft_tokens=gamma)
            assert torch.equal(plain, drafted)


def test_the_engine_serves_a_loaded_draft_losslessly(target):
    """`DSparkEngine` batches requests with a loaded SpecForge draft: each request's greedy tokens are the target's
    and it keeps the rounds a single-request `generate()` has."""
    draft = load_draft("specforge", target)
    prompts = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15]]
    requests = DSparkEngine(target, draft, scheduler="full").generate(prompts, SamplingParams(max_new_tokens=12))
    for prompt, request in zip(prompts, requests, strict=True):
        out = target.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, assistant_model=draft,
                              return_dict_in_generate=True)
        assert request.token_ids == out.sequences[0, len(prompt) :].tolist()
        assert request.stats.accepted == out.speculation_stats.accepted
