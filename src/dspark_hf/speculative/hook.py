"""Makes `target.generate(input_ids, assistant_model=draft)` run DSpark's decoding loop for DSpark and EAGLE-3 drafts.

transformers has a public entry for a decoding loop of one's own, `generate(custom_generate=callable)`, but no way to
pick it from the assistant's type. So on import dspark_hf wraps the public `GenerationMixin.generate` once: when
`assistant_model` is a [`DSparkDraftModel`] or an [`Eagle3DraftModel`], the call becomes
`generate(custom_generate=speculative_decoding, draft=assistant_model, token_streamer=streamer)`; every other call
goes to transformers unchanged. Nothing else of transformers is wrapped or replaced.
"""

import functools
import inspect

from transformers.generation.utils import GenerationMixin

from .decoding import DRAFT_CLASSES, speculative_decoding


def _wrap_generate(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        if not isinstance(bound.arguments.get("assistant_model"), DRAFT_CLASSES):
            return original(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        del arguments["self"]
        if arguments.get("custom_generate") is not None:
            raise ValueError(
                f"generate() got both a {type(arguments['assistant_model']).__name__} assistant and custom_generate; "
                "its drafting is itself a custom decoding loop. Drop one of them."
            )
        draft = arguments.pop("assistant_model")
        streamer = arguments.pop("streamer", None)
        return original(
            self, custom_generate=speculative_decoding, draft=draft, token_streamer=streamer, **arguments
        )

    generate.__dspark_original__ = original
    return generate


def install() -> None:
    """Wraps `GenerationMixin.generate` once (a second call changes nothing)."""
    if not hasattr(GenerationMixin.generate, "__dspark_original__"):
        GenerationMixin.generate = _wrap_generate(GenerationMixin.generate)


def uninstall() -> None:
    """Restores transformers' own `generate`."""
    if hasattr(GenerationMixin.generate, "__dspark_original__"):
        GenerationMixin.generate = GenerationMixin.generate.__dspark_original__
