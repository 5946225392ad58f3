"""The transformers entry points dspark_hf relies on, each by name, and the supported-release check.

A release that drops or changes one of them fails here with the name of what disappeared, instead of somewhere
inside generate().
"""

import inspect
import re
from importlib.metadata import requires
from pathlib import Path

import pytest
import torch
from conftest import make_target
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import DynamicCache
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.utils import GenerationMixin

import dspark_hf.compat as compat
from dspark_hf import DSparkDraftModel, speculative_decoding

ROOT = Path(__file__).resolve().parents[1]


def test_supported_range_is_the_one_pyproject_declares():
    declared = [Requirement(r) for r in requires("dspark_hf") if Requirement(r).name == "transformers"]
    assert [r.specifier for r in declared] == [SpecifierSet(compat.SUPPORTED_TRANSFORMERS)]
    assert f'"transformers{compat.SUPPORTED_TRANSFORMERS}"' in (ROOT / "pyproject.toml").read_text()
    assert compat.installed_transformers() >= Version("5.24")


@pytest.mark.parametrize("release", ["5.23.0", "6.0.0", "4.57.1"])
def test_unsupported_release_is_one_clear_error(release):
    with pytest.raises(ImportError, match=re.escape(f"transformers{compat.SUPPORTED_TRANSFORMERS}")):
        compat.check_transformers_version(Version(release))


@pytest.mark.parametrize("release", ["5.24.0", "5.25.0", "5.99.0.dev0"])
def test_supported_releases_pass(release):
    compat.check_transformers_version(Version(release))


def test_generate_takes_a_callable_custom_generate_and_forwards_its_own_keywords():
    """`generate(custom_generate=callable)` calls it as the decoding loop and forwards keyword arguments that the
    callable's signature adds (how the draft and the streamer reach speculative_decoding)."""
    assert "custom_generate" in inspect.signature(GenerationMixin.generate).parameters
    target = make_target("llama", vocab_size=32)
    seen = {}

    def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, draft=None, **model_kwargs):
        seen.update(draft=draft, cache=model_kwargs.get("cache"), max_length=generation_config.max_length)
        return input_ids

    target.generate(torch.tensor([[1, 2]]), custom_generate=loop, draft="the draft", max_new_tokens=3)
    assert seen["draft"] == "the draft" and seen["max_length"] == 5
    assert hasattr(seen["cache"], "crop"), "generate() no longer passes the cache to a custom loop as `cache`"


def test_prepare_inputs_for_generation_takes_next_sequence_length():
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert {"next_sequence_length", "is_first_iteration", "cache"} <= set(parameters)


def test_cache_rollback_api():
    cache = DynamicCache()
    for name in ("crop", "activate_past_recording", "get_seq_length"):
        assert callable(getattr(cache, name, None)), f"Cache.{name} disappeared"
    assert isinstance(type(cache).is_croppable, property) or hasattr(cache, "is_croppable")
    target = make_target("llama", vocab_size=32)
    cache = DynamicCache(config=target.config)
    target(torch.tensor([[1, 2, 3, 4]]), cache=cache, use_cache=True)
    compat.keep_rollback_states(cache, 3)
    target(torch.tensor([[5, 6]]), cache=cache, use_cache=True)
    cache.crop(-2)  # a negative argument removes that many tokens
    assert cache.get_seq_length() == 4 and cache.is_croppable


def test_output_hidden_states_takes_a_list_of_layers():
    """The loop asks the target for the draft's layers only; unselected entries come back as None."""
    target = make_target("llama", vocab_size=32, num_layers=4)
    out = target(torch.tensor([[1, 2, 3]]), output_hidden_states=[2, 4])
    assert len(out.hidden_states) == 5
    assert out.hidden_states[2] is not None and out.hidden_states[4] is not None and out.hidden_states[1] is None


def test_generate_output_class_has_the_fields_the_loop_fills():
    fields = set(GenerateDecoderOnlyOutput.__dataclass_fields__)
    assert {"sequences", "scores", "logits", "attentions", "hidden_states", "cache"} <= fields


def test_loop_returns_the_cache_transformers_prepared():
    target = make_target("llama", vocab_size=32)
    draft = DSparkDraftModel.from_target(target, block_size=3, mask_token_id=31).eval()
    out = target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
                          custom_generate=speculative_decoding, draft=draft)
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1  # every token but the last, as plain decoding


def test_attention_implementation_reads_the_config():
    target = make_target("llama", vocab_size=32, attn_implementation="eager")
    assert compat.attention_implementation(target.config) == "eager"
    target.set_attn_implementation("sdpa")
    assert compat.attention_implementation(target.config) == "sdpa"


def test_cache_layer_tensors_round_trip_and_copy():
    """`DynamicCache.layers[i].keys / .values` (read and replaced by the engine), and copying a filled cache."""
    target = make_target("llama", vocab_size=32, num_layers=2)
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), cache=cache, use_cache=True)
    keys, values = compat.cache_layer_tensors(cache)
    assert len(keys) == len(values) == 2 and keys[0].shape[0] == 2 and keys[0].shape[2] == 4
    copied = compat.copy_cache(cache)
    compat.set_cache_layer_tensors(cache, [k[1:, :, 1:] for k in keys], [v[1:, :, 1:] for v in values])
    assert cache.get_seq_length() == 3 and compat.cache_layer_tensors(cache)[0][1].shape[0] == 1
    assert copied.get_seq_length() == 4 and torch.equal(compat.cache_layer_tensors(copied)[1][0], values[0])
    copied.crop(-1)
    assert compat.cache_layer_tensors(copied)[0][0].shape[2] == 3 and keys[0].shape[2] == 4
    with pytest.raises(ValueError, match="Expected 2 key and value tensors"):
        compat.set_cache_layer_tensors(cache, keys[:1], values[:1])


def test_push_to_hub_uploads_through_the_hooked_private_method():
    """`UploadHook` overrides `PushToHubMixin._upload_modified_files`, which push_to_hub calls with the working folder."""
    from transformers.utils.hub import PushToHubMixin

    parameters = inspect.signature(PushToHubMixin._upload_modified_files).parameters
    assert list(parameters)[:4] == ["self", "working_dir", "repo_id", "files_timestamps"]
    assert "_upload_modified_files" in inspect.getsource(PushToHubMixin.push_to_hub)
    assert issubclass(DSparkDraftModel, compat.UploadHook)
