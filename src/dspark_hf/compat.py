"""Everything in dspark_hf that depends on which transformers release is installed.

- The supported range (`SUPPORTED_TRANSFORMERS`, the same as pyproject's dependency), checked when dspark_hf is
  imported, so that an unsupported release fails at once with one clear error instead of mid-generation.
- Rolling back a hybrid (linear-attention / SSM) target's recurrent state: `Cache.activate_past_recording` takes the
  number of per-token states to keep from 5.25 on; 5.24 cannot roll recurrent states back at all.
- The few places where dspark_hf reaches past transformers' documented API, each behind one function here: the
  attention implementation a config selected, the key/value tensors of a `DynamicCache`'s layers (the engine
  rearranges rows and slots of them), copying a filled cache, and the upload step of `push_to_hub`
  ([`UploadHook`]).

`tests/test_compat.py` names every transformers entry point the library relies on beyond its documented classes, so a
release that drops one fails there with the name of what disappeared.
"""

import copy

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_TRANSFORMERS = ">=5.24,<6"
# The first release whose caches keep per-token recurrent states, so hybrid targets can be rolled back.
RECURRENT_ROLLBACK_TRANSFORMERS = Version("5.25")


def installed_transformers() -> Version:
    return Version(transformers.__version__)


def check_transformers_version(installed: Version | None = None) -> None:
    """Raises ImportError naming the supported range when the installed transformers lies outside it."""
    installed = installed or installed_transformers()
    if installed.release and Version(".".join(map(str, installed.release))) in SpecifierSet(SUPPORTED_TRANSFORMERS):
        return
    raise ImportError(
        f"dspark_hf supports transformers{SUPPORTED_TRANSFORMERS}, but transformers {installed} is installed. "
        f'Install a supported release: pip install "transformers{SUPPORTED_TRANSFORMERS}".'
    )


def keep_rollback_states(cache, tokens: int) -> None:
    """Makes `cache.crop(-k)` able to undo up to `tokens − 1` of the next pass's `tokens` positions.

    Full-attention layers can always be cropped; sliding-window layers keep what they would drop; linear-attention
    layers keep their per-token recurrent states (5.25+; a pass over anchor + n proposals needs n + 1 of them, or a
    round that rejects everything restores the state one token too late).
    """
    if installed_transformers() >= RECURRENT_ROLLBACK_TRANSFORMERS:
        cache.activate_past_recording(recurrent_states_to_keep=tokens)
    else:
        cache.activate_past_recording()


def rollback_unsupported_message(model) -> str:
    """Why `model`'s cache cannot be rolled back after a verification pass, and what to do."""
    hint = (
        f"Hybrid (linear-attention) targets need transformers>={RECURRENT_ROLLBACK_TRANSFORMERS}, which can roll "
        f"back recurrent states; transformers {installed_transformers()} is installed."
        if installed_transformers() < RECURRENT_ROLLBACK_TRANSFORMERS
        else "Use a cache that can be cropped (a DynamicCache, or a static cache no longer than its sliding window)."
    )
    return (
        f"Speculative decoding rolls the target's cache back past rejected tokens, but the cache of "
        f"{type(model).__name__} cannot be cropped. {hint}"
    )



def attention_implementation(config) -> str | None:
    """The attention implementation ("sdpa", "eager", "flash_attention_2", ...) `config`'s model runs with."""
    return config._attn_implementation


def cache_layer_tensors(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The keys and the values `(batch, heads, slots, head_dim)` of every layer of a filled `DynamicCache`."""
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def set_cache_layer_tensors(cache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Replaces every layer's keys and values of a filled `DynamicCache` (one tensor per layer, as
    [`cache_layer_tensors`] returns them), e.g. after selecting rows or compacting slots."""
    if len(keys) != len(cache.layers) or len(values) != len(cache.layers):
        raise ValueError(f"Expected {len(cache.layers)} key and value tensors, got {len(keys)} and {len(values)}.")
    for layer, layer_keys, layer_values in zip(cache.layers, keys, values, strict=True):
        layer.keys, layer.values = layer_keys, layer_values


def copy_cache(cache):
    """An independent copy of a filled cache (its tensors copied, so growing one leaves the other as it was)."""
    return copy.deepcopy(cache)


class UploadHook:
    """Mixin for a `PreTrainedModel` that must change the files `push_to_hub` uploads.

    `push_to_hub` (and `save_pretrained(push_to_hub=True)`) saves the model into a working folder, puts the Hub's
    README.md (or a placeholder) there, then uploads the folder through the private `_upload_modified_files`; the
    model's `before_upload(working_dir, repo_id)` runs just before that upload.
    """

    def before_upload(self, working_dir: str, repo_id: str) -> None:
        """Called with the folder about to be uploaded to `repo_id`; edit its files in place."""

    def _upload_modified_files(self, working_dir, repo_id, files_timestamps, **kwargs):
        self.before_upload(working_dir, repo_id)
        return super()._upload_modified_files(working_dir, repo_id, files_timestamps, **kwargs)
