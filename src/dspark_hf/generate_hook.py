"""The hook that makes `target.generate(..., assistant_model=draft)` use DSpark drafting.

transformers 5.x picks its candidate generator in `GenerationMixin._get_candidate_generator`, a fixed if/elif chain
with no third-party entry. On import we wrap that method once, plus `_validate_generation_mode` (to reject decoding
modes DSpark cannot serve) and `_assisted_decoding` (to end the output exactly where plain decoding would stop: the
loop checks stopping criteria only after appending a whole round). Every wrapper hands calls that do not involve a
[`DSparkDraftModel`] to the original method unchanged, so other assistants and prompt lookup behave as before.
"""

import functools
import inspect

import transformers
from packaging import version
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import MaxTimeCriteria
from transformers.generation.utils import GenerationMixin
from transformers.utils import logging

from .generation import DSparkCandidateGenerator
from .modeling_dspark import DSparkDraftModel

logger = logging.get_logger(__name__)

TESTED_TRANSFORMERS = (version.parse("5.24"), version.parse("6"))
_EXPECTED_PARAMETERS = {"generation_config", "input_ids", "logits_processor", "assistant_model"}


def _is_dspark(assistant_model) -> bool:
    return isinstance(assistant_model, DSparkDraftModel)


def _wrap_get_candidate_generator(original):
    @functools.wraps(original)
    def _get_candidate_generator(self, generation_config, input_ids, *args, assistant_model=None, **kwargs):
        if not _is_dspark(assistant_model):
            return original(self, generation_config, input_ids, *args, assistant_model=assistant_model, **kwargs)
        bound = inspect.signature(original).bind(self, generation_config, input_ids, *args, **kwargs)
        return DSparkCandidateGenerator(
            target=self,
            draft=assistant_model,
            input_ids=input_ids,
            generation_config=generation_config,
            logits_processor=bound.arguments.get("logits_processor"),
        )

    _get_candidate_generator.__dspark_original__ = original
    return _get_candidate_generator


def _wrap_validate_generation_mode(original):
    @functools.wraps(original)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        if _is_dspark(generation_mode_kwargs.get("assistant_model")) and (
            generation_mode != GenerationMode.ASSISTED_GENERATION
        ):
            raise ValueError(
                f"A DSparkDraftModel assistant supports greedy decoding and sampling only, but these settings select "
                f"{generation_mode} (num_beams={generation_config.num_beams}). Use num_beams=1, or drop assistant_model."
            )
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    _validate_generation_mode.__dspark_original__ = original
    return _validate_generation_mode


def _first_stop(sequences, stopping_criteria, start: int) -> int | None:
    """Smallest length ≥ `start` at which a (time-independent) stopping criterion fires, if any."""
    criteria = [c for c in stopping_criteria if not isinstance(c, MaxTimeCriteria)]
    for length in range(start, sequences.shape[1]):
        if any(bool(c(sequences[:, :length], None).any()) for c in criteria):
            return length
    return None


def _truncate(output, length: int, prompt_length: int):
    """Cuts a generate() result (tensor or ModelOutput with per-token tuples) to `length` tokens."""
    if not hasattr(output, "sequences"):
        return output[:, :length]
    output.sequences = output.sequences[:, :length]
    for name in ("scores", "logits", "attentions", "hidden_states"):
        value = getattr(output, name, None)
        if value is not None:
            setattr(output, name, value[: length - prompt_length])
    return output


def _wrap_assisted_decoding(original):
    @functools.wraps(original)
    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, *args, **kwargs):
        draft = kwargs.get("assistant_model")
        output = original(self, input_ids, logits_processor, stopping_criteria, *args, **kwargs)
        if not _is_dspark(draft):
            return output
        sequences = output.sequences if hasattr(output, "sequences") else output
        # Criteria were checked only at round ends, so any earlier position may be where plain decoding stops.
        stop = _first_stop(sequences, stopping_criteria, input_ids.shape[1] + 1)
        return output if stop is None else _truncate(output, stop, input_ids.shape[1])

    _assisted_decoding.__dspark_original__ = original
    return _assisted_decoding


_WRAPPERS = {
    "_get_candidate_generator": _wrap_get_candidate_generator,
    "_validate_generation_mode": _wrap_validate_generation_mode,
    "_assisted_decoding": _wrap_assisted_decoding,
}


def install() -> bool:
    """Installs the wrappers once; returns whether DSpark drafting is available in `generate()`."""
    current = version.parse(transformers.__version__)
    method = getattr(GenerationMixin, "_get_candidate_generator", None)
    missing = [name for name in _WRAPPERS if not hasattr(GenerationMixin, name)]
    if missing or not _EXPECTED_PARAMETERS <= set(inspect.signature(method).parameters):
        logger.warning(
            "transformers %s changed its assisted-generation internals: generate(assistant_model=DSparkDraftModel) is "
            "unavailable. Install transformers>=5.24,<6.",
            transformers.__version__,
        )
        return False
    if not TESTED_TRANSFORMERS[0] <= current < TESTED_TRANSFORMERS[1]:
        logger.warning("dspark_hf's generate() hook is tested with transformers>=5.24,<6, found %s.", current)
    for name, wrap in _WRAPPERS.items():
        current_method = getattr(GenerationMixin, name)
        if not hasattr(current_method, "__dspark_original__"):
            setattr(GenerationMixin, name, wrap(current_method))
    return True


def uninstall() -> None:
    """Restores transformers' original methods."""
    for name in _WRAPPERS:
        method = getattr(GenerationMixin, name)
        if hasattr(method, "__dspark_original__"):
            setattr(GenerationMixin, name, method.__dspark_original__)
