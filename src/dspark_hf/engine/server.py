"""A minimal OpenAI-compatible HTTP endpoint over [`DSparkEngine`] (`dspark-hf serve`).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`) and `GET /v1/models`.
Standard library only (`http.server.ThreadingHTTPServer`): one thread per connection submits requests to the
engine, and one background thread drives the engine loop, so concurrent clients share speculative rounds.
"""

import json
import queue
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from transformers.utils import logging

from ..speculative.sampling import SamplingParams
from ..targets import chat_input_ids
from .engine import DSparkEngine
from .requests import EngineRequest

logger = logging.get_logger(__name__)

MAX_BODY_BYTES = 1 << 22
MAX_STOP_STRINGS = 4


class RequestError(ValueError):
    """A client error, answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class DSparkServer(ThreadingHTTPServer):
    """OpenAI-compatible chat completions over a [`DSparkEngine`] that has a tokenizer with a chat template.

    Args:
        engine: the engine (its tokenizer renders chats and decodes text).
        model_name: the id listed by `/v1/models` and echoed in responses.
        host, port: where to listen (`port=0` picks a free port; see `url`).
        default_max_tokens: completion length when a request gives neither `max_tokens` nor `max_completion_tokens`.

    Use `start()` / `close()` (or `with`) to run in the background, `serve()` to block.
    """

    daemon_threads = True

    def __init__(
        self,
        engine: DSparkEngine,
        model_name: str = "dspark",
        host: str = "127.0.0.1",
        port: int = 8000,
        default_max_tokens: int = 256,
    ):
        tokenizer = engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("DSparkServer needs DSparkEngine(..., tokenizer=...) with a chat template.")
        super().__init__((host, port), _Handler)
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        eos = [tokenizer.eos_token_id, *_as_list(engine.target.generation_config.eos_token_id)]
        self.stop_token_ids = tuple(sorted({int(t) for t in eos if t is not None}))
        self._stop = threading.Event()
        self._background: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def _start_engine_loop(self) -> None:
        loop = threading.Thread(target=self.engine.run_forever, args=(self._stop,), name="dspark-engine", daemon=True)
        loop.start()
        self._background.append(loop)

    def start(self) -> "DSparkServer":
        """Runs the engine loop and the HTTP server in background threads; returns self."""
        self._start_engine_loop()
        http = threading.Thread(target=self.serve_forever, name="dspark-http", daemon=True)
        http.start()
        self._background.append(http)
        return self

    def serve(self) -> None:
        """Runs the engine loop in the background and serves HTTP in this thread until interrupted."""
        self._start_engine_loop()
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Stops serving and the engine loop."""
        if any(t.name == "dspark-http" for t in self._background):
            self.shutdown()
        self._stop.set()
        self.engine.wake()
        for thread in self._background:
            thread.join(timeout=10)
        self._background.clear()
        self.server_close()

    def __enter__(self) -> "DSparkServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- request translation -----------------------------------------------------------------------------------------

    def parse_chat_request(self, body: dict) -> tuple[list[int], SamplingParams, bool, bool]:
        """A chat completion body → (prompt ids, sampling params, stream, include usage in the stream)."""
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("`messages` must be a non-empty list of {role, content} objects.")
        chat = [{"role": _field(m, "role"), "content": _content(m)} for m in messages]
        if body.get("n", 1) != 1:
            raise RequestError("Only n=1 is supported.")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or self.default_max_tokens
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} strings.")
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                do_sample=temperature is not None and temperature > 0,
                temperature=temperature if temperature else 1.0,
                top_p=1.0 if top_p is None else top_p,
                top_k=body.get("top_k") or 0,
                stop_token_ids=self.stop_token_ids,
                stop=stop,
            )
            prompt_ids = chat_input_ids(self.tokenizer, chat)[0].tolist()
        except (TypeError, ValueError) as error:
            raise RequestError(str(error)) from error
        except Exception as error:  # noqa: BLE001 - jinja errors of a user-controlled chat
            raise RequestError(f"The chat could not be rendered: {error}") from error
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise RequestError("`stream_options` must be an object.")
        include_usage = bool(stream_options.get("include_usage", False))
        return prompt_ids, params, bool(body.get("stream", False)), include_usage

    def completion(self, completion_id: str, request: EngineRequest) -> dict:
        """The `chat.completion` object of a finished request."""
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": request.text},
                    "finish_reason": _finish_reason(request),
                }
            ],
            "usage": _usage(request),
        }

    def chunk(self, completion_id: str, delta: dict, finish_reason: str | None = None) -> dict:
        """One `chat.completion.chunk` of a stream."""
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _field(message, name: str) -> str:
    if not isinstance(message, dict) or not isinstance(message.get(name), str):
        raise RequestError(f"Every message needs a string `{name}`.")
    return message[name]


def _content(message) -> str:
    """A message's text: a string, or the concatenated `text` parts of a content list."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError("Only text content parts are supported.")
        return "".join(p["text"] for p in content)
    return _field(message, "content")


def _finish_reason(request: EngineRequest) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def _usage(request: EngineRequest) -> dict:
    prompt, completion = len(request.prompt_token_ids), len(request.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Handler(BaseHTTPRequestHandler):
    server: DSparkServer
    server_version = "dspark-hf"

    def log_message(self, format: str, *args) -> None:
        logger.info("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._error(HTTPStatus.NOT_FOUND, f"No route GET {self.path}.")
        model = {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "dspark-hf"}
        self._json(HTTPStatus.OK, {"object": "list", "data": [model]})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(HTTPStatus.NOT_FOUND, f"No route POST {self.path}.")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                raise RequestError(f"A JSON body of 1 to {MAX_BODY_BYTES} bytes (with Content-Length) is required.")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(f"Invalid JSON: {error}") from error
            prompt_ids, params, stream, include_usage = self.server.parse_chat_request(body)
        except RequestError as error:
            return self._error(error.status, str(error))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        events: queue.Queue = queue.Queue()  # (new text, finished) per round, filled by the engine thread
        try:
            request = self.server.engine.add_request(
                prompt_ids, params, request_id=completion_id,
                callback=(lambda r, tokens, text: events.put((text, r.finished))) if stream else None,
            )
        except ValueError as error:
            return self._error(HTTPStatus.BAD_REQUEST, str(error))
        if stream:
            return self._stream(request, events, include_usage)
        request.wait()
        if request.finish_reason == "error":
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, request.error, "server_error")
        self._json(HTTPStatus.OK, self.server.completion(completion_id, request))

    def _stream(self, request: EngineRequest, events: queue.Queue, include_usage: bool) -> None:
        """Server-sent events: a role chunk, content chunks as rounds produce text, a final chunk, `[DONE]`."""
        completion_id = request.request_id
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self._event(self.server.chunk(completion_id, {"role": "assistant", "content": ""}))
            finished = False
            while not finished:
                text, finished = events.get()
                if text:
                    self._event(self.server.chunk(completion_id, {"content": text}))
            if request.finish_reason == "error":
                self._event({"error": {"message": request.error, "type": "server_error"}})
            else:
                self._event(self.server.chunk(completion_id, {}, _finish_reason(request)))
                if include_usage:
                    usage = self.server.chunk(completion_id, {}) | {"choices": [], "usage": _usage(request)}
                    self._event(usage)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.engine.cancel(completion_id)  # the client went away: free its slot in the batch

    def _event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: HTTPStatus, data: dict) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status.value}})


__all__ = ["DSparkServer", "RequestError"]
