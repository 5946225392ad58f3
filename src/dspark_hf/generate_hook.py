"""The hook that makes `target.generate(..., assistant_model=draft)` use DSpark drafting.

transformers 5.x picks its candidate generator in `GenerationMixin._get_candidate_generator`, a fixed if/elif chain
with no third-party entry. On import we wrap that method once (and `_validate_generation_mode`, to reject decoding
modes DSpark cannot serve). Both wrappers hand every call that does not involve a [`DSparkDraftModel`] to the
original method unchanged, so other assistants and prompt lookup behave exactly as before.
"""

import functools
import inspect

import transformers
from packaging import version
from transformers.generation.configuration_utils import GenerationMode
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


def install() -> bool:
    """Installs the wrappers once; returns whether DSpark drafting is available in `generate()`."""
    current = version.parse(transformers.__version__)
    method = getattr(GenerationMixin, "_get_candidate_generator", None)
    validate = getattr(GenerationMixin, "_validate_generation_mode", None)
    if method is None or validate is None or not _EXPECTED_PARAMETERS <= set(inspect.signature(method).parameters):
        logger.warning(
            "transformers %s changed its assisted-generation internals: generate(assistant_model=DSparkDraftModel) is "
            "unavailable. Install transformers>=5.24,<6.",
            transformers.__version__,
        )
        return False
    if not TESTED_TRANSFORMERS[0] <= current < TESTED_TRANSFORMERS[1]:
        logger.warning("dspark_hf's generate() hook is tested with transformers>=5.24,<6, found %s.", current)
    if not hasattr(method, "__dspark_original__"):
        GenerationMixin._get_candidate_generator = _wrap_get_candidate_generator(method)
    if not hasattr(validate, "__dspark_original__"):
        GenerationMixin._validate_generation_mode = _wrap_validate_generation_mode(validate)
    return True


def uninstall() -> None:
    """Restores transformers' original methods."""
    for name in ("_get_candidate_generator", "_validate_generation_mode"):
        method = getattr(GenerationMixin, name)
        if hasattr(method, "__dspark_original__"):
            setattr(GenerationMixin, name, method.__dspark_original__)
