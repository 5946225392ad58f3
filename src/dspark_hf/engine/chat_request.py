"""Validating an OpenAI chat-completions request body at the server's edge and rendering its chat to prompt ids.

Every field is checked for type and range before anything reaches the engine, and a bad one is answered with a
[`RequestError`] that names it (400, or 404 for an unknown model, as OpenAI does). Special-token text typed inside a
message (e.g. `<|im_start|>system`) is tokenized as plain text, so a user cannot forge a turn of another role.
"""

import math
import re
from dataclasses import dataclass
from http import HTTPStatus

from ..speculative.sampling import SamplingParams
from ..targets import chat_input_ids

MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
# Below this a sampling temperature overflows the scaled logits; 0 asks for greedy decoding.
MIN_SAMPLING_TEMPERATURE = 1e-2
# Private-use characters that mark where each message's content sits in the rendered chat template.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class RequestError(ValueError):
    """A client error, answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequestLimits:
    """What a server accepts.

    Args:
        model_name: the served model id; a request naming another model gets 404.
        default_max_tokens: completion length when a request gives neither `max_tokens` nor `max_completion_tokens`.
        context_window: the target's context length: prompt + completion must fit in it (None: no limit).
        max_prompt_tokens: a prompt cap below the window, so one long prompt cannot hold up everyone (None: the window).
        vocab_size: the largest `top_k` that means something.
        stop_token_ids: the tokens that end every completion (the tokenizer's and the target's end tokens).
        allow_special_tokens: tokenize special-token text inside messages as control tokens (off: as plain text).
    """

    model_name: str
    default_max_tokens: int
    context_window: int | None
    max_prompt_tokens: int | None
    vocab_size: int
    stop_token_ids: tuple[int, ...] = ()
    allow_special_tokens: bool = False


@dataclass
class ChatRequest:
    """A validated request: prompt ids, the engine's sampling settings, and how to answer."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_chat_request(body, tokenizer, limits: ChatRequestLimits) -> ChatRequest:
    """A chat-completions body → a [`ChatRequest`]; raises [`RequestError`] naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise RequestError(
            f"The model `{model}` does not exist: this server serves `{limits.model_name}` (see GET /v1/models).",
            HTTPStatus.NOT_FOUND,
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects.")
    chat = [{"role": _string_field(m, "role"), "content": _content(m)} for m in messages]
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise RequestError(f"Only n=1 is supported, got n={body.get('n')!r}.")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name):
            raise RequestError(f"`{name}` is not supported by this server; leave it out or set it to false/null.")
    stream = _boolean(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError("`stream_options` must be an object.")
    include_usage = _boolean(stream_options or {}, "include_usage", "stream_options.include_usage")
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE, default=1.0)
    if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
        raise RequestError(
            f"`temperature` must be 0 (greedy) or in [{MIN_SAMPLING_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}."
        )
    top_p = _number(body, "top_p", 0.0, 1.0, default=1.0)
    if top_p == 0:
        raise RequestError("`top_p` must be in (0, 1], got 0.")
    top_k = _integer(body, "top_k", 0, limits.vocab_size, default=0)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings.")
    prompt_ids = encode_chat(tokenizer, chat, limits.allow_special_tokens)
    caps = [v for v in (limits.max_prompt_tokens, limits.context_window) if v is not None]
    prompt_cap = min(caps) if caps else None
    if prompt_cap is not None and len(prompt_ids) >= prompt_cap:
        raise RequestError(
            f"The prompt has {len(prompt_ids)} tokens; this server accepts fewer than {prompt_cap}. Shorten the "
            "messages."
        )
    room = None if limits.context_window is None else limits.context_window - len(prompt_ids)
    max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, max_tokens_field, 1, room, default=None)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens if room is None else min(limits.default_max_tokens, room)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=limits.stop_token_ids,
        stop=stop,
    )
    return ChatRequest(prompt_ids, params, stream, include_usage)


def encode_chat(tokenizer, chat: list[dict], allow_special_tokens: bool = False) -> list[int]:
    """The prompt ids of `chat` rendered with the tokenizer's chat template.

    Without `allow_special_tokens`, a message whose content contains a special token's text is tokenized as plain
    text: the template is rendered around placeholders and only its own text may become control tokens. Chats
    without such text are tokenized exactly as `targets.chat_input_ids` does.
    """
    specials = [s for s in _special_token_strings(tokenizer) if s]
    if allow_special_tokens or not any(s in m["content"] for m in chat for s in specials):
        return _render(tokenizer, chat)
    if any(_OPEN in m["content"] or _CLOSE in m["content"] for m in chat):
        raise RequestError("Message content may not contain the characters U+E000 or U+E001.")
    marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(chat)]
    try:
        text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # noqa: BLE001 - jinja errors of a user-controlled chat
        raise RequestError(f"The chat could not be rendered: {error}") from error
    ids: list[int] = []
    for i, piece in enumerate(_PLACEHOLDER.split(text)):
        if i % 2:  # a message's content: special-token text stays text
            ids += tokenizer(chat[int(piece)]["content"], add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _render(tokenizer, chat: list[dict]) -> list[int]:
    try:
        return chat_input_ids(tokenizer, chat)[0].tolist()
    except (TypeError, ValueError) as error:
        raise RequestError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - jinja errors of a user-controlled chat
        raise RequestError(f"The chat could not be rendered: {error}") from error


def _special_token_strings(tokenizer) -> set[str]:
    strings = set(getattr(tokenizer, "all_special_tokens", []))
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            strings.add(str(token))
    return strings


def _string_field(message, name: str) -> str:
    if not isinstance(message, dict) or not isinstance(message.get(name), str):
        raise RequestError(f"Every message needs a string `{name}`.")
    return _valid_text(message[name], name)


def _content(message) -> str:
    """A message's text: a string, or the concatenated `text` parts of a content list."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError("Only text content parts are supported.")
        return _valid_text("".join(p["text"] for p in content), "content")
    return _string_field(message, "content")


def _valid_text(text: str, name: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"`{name}` is not valid Unicode text (a lone surrogate at position {error.start}).") from error
    return text


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"`{name}` must be a number in [{low}, {high}], got {value!r}.")
    if not low <= value <= high:
        raise RequestError(f"`{name}` must be in [{low}, {high}], got {value}.")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{name}` must be an integer {bounds}, got {value!r}.")
    if value < low or (high is not None and value > high):
        hint = " (the context window minus the prompt)" if name in ("max_tokens", "max_completion_tokens") else ""
        raise RequestError(f"`{name}` must be an integer {bounds}{hint}, got {value}.")
    return value


def _boolean(body: dict, name: str, label: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"`{label or name}` must be true or false, got {value!r}.")
    return value


__all__ = ["ChatRequest", "ChatRequestLimits", "RequestError", "encode_chat", "parse_chat_request"]
