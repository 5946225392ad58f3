"""A minimal OpenAI-compatible HTTP endpoint over [`DSparkEngine`] (`dspark-hf serve`).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`) and `GET /v1/models`.
Standard library only (`http.server.ThreadingHTTPServer`): one thread per connection submits requests to the
engine, and one background thread drives the engine loop, so concurrent clients share speculative rounds.
"""

import hmac
import ipaddress
import json
import queue
import select
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from transformers.utils import logging

from .chat_request import ChatRequest, ChatRequestLimits, RequestError, parse_chat_request
from .engine import DSparkEngine
from .requests import EngineRequest

logger = logging.get_logger(__name__)

MAX_BODY_BYTES = 1 << 22
LISTEN_BACKLOG = 128
# Seconds a connection may stay silent while its request is read (slow or half-open clients are dropped).
SOCKET_TIMEOUT_S = 30.0


class DSparkServer(ThreadingHTTPServer):
    """OpenAI-compatible chat completions over a [`DSparkEngine`] that has a tokenizer with a chat template.

    Args:
        engine: the engine (its tokenizer renders chats and decodes text).
        model_name: the id listed by `/v1/models` and echoed in responses.
        host, port: where to listen (`port=0` picks a free port; see `url`).
        default_max_tokens: completion length when a request gives neither `max_tokens` nor `max_completion_tokens`.
        max_prompt_tokens: longest prompt accepted (None: the target's context window).
        allow_special_tokens: let special-token text inside messages become control tokens (default: plain text).
        api_key: when set, every request needs `Authorization: Bearer <api_key>` (401 otherwise).
        max_connections: connections served at once; one more is answered 503 at once and closed.
        max_queued_requests: requests waiting for a place in the batch; beyond it a request is answered 429.

    On a loopback address the server answers only requests whose `Host` (and `Origin`, when sent) is a loopback
    name, so a web page cannot reach it through DNS rebinding; POST bodies must be `application/json`, which a
    browser cannot send cross-origin without asking first.

    Use `start()` / `close()` (or `with`) to run in the background, `serve()` to block.
    """

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        engine: DSparkEngine,
        model_name: str = "dspark",
        host: str = "127.0.0.1",
        port: int = 8000,
        default_max_tokens: int = 256,
        max_prompt_tokens: int | None = None,
        allow_special_tokens: bool = False,
        api_key: str | None = None,
        max_connections: int = 256,
        max_queued_requests: int = 256,
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
        self.api_key = api_key or None
        self.max_queued_requests = max_queued_requests
        self._connection_slots = threading.BoundedSemaphore(max_connections)
        self.loopback = _is_loopback(host)
        if not self.loopback and self.api_key is None:
            logger.warning(
                "Serving on %s without an API key: anyone who can reach this address can use the model. Pass "
                "api_key= (dspark-hf serve --api-key or DSPARK_API_KEY), or bind to 127.0.0.1.",
                host,
            )
        eos = [tokenizer.eos_token_id, *_as_list(engine.target.generation_config.eos_token_id)]
        self.stop_token_ids = tuple(sorted({int(t) for t in eos if t is not None}))
        text_config = engine.target.config.get_text_config()
        self.limits = ChatRequestLimits(
            model_name=model_name,
            default_max_tokens=default_max_tokens,
            context_window=getattr(text_config, "max_position_embeddings", None),
            max_prompt_tokens=max_prompt_tokens,
            vocab_size=engine.vocab_size,
            stop_token_ids=self.stop_token_ids,
            allow_special_tokens=allow_special_tokens,
        )
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

    def process_request(self, request, client_address) -> None:
        """Serves the connection in its own thread, or answers 503 at once when `max_connections` are being served."""
        if not self._connection_slots.acquire(blocking=False):
            body = json.dumps({"error": {"message": "Too many connections; retry shortly.", "type": "server_busy",
                                         "code": 503}}).encode()
            head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                    "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
            threading.Thread(target=self._refuse, args=(request, head.encode() + body), daemon=True).start()
            return
        super().process_request(request, client_address)

    def _refuse(self, connection, answer: bytes) -> None:
        """Sends `answer`, then reads what the client still sends before closing, so that the close does not reset
        the connection before the client has read the answer."""
        try:
            connection.sendall(answer)
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(1.0)
            while connection.recv(65536):
                pass
        except OSError:
            pass
        finally:
            connection.close()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def __enter__(self) -> "DSparkServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- request translation -----------------------------------------------------------------------------------------

    def parse_chat_request(self, body) -> ChatRequest:
        """A chat-completions body → a validated [`ChatRequest`] (raises [`RequestError`] naming the bad field)."""
        return parse_chat_request(body, self.tokenizer, self.limits)

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


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _hostname(value: str) -> str:
    """The host of a `Host` header or of an origin URL, without port or brackets."""
    value = value.split("://", 1)[-1].split("/", 1)[0]
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _finish_reason(request: EngineRequest) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def _usage(request: EngineRequest) -> dict:
    prompt, completion = len(request.prompt_token_ids), len(request.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Handler(BaseHTTPRequestHandler):
    server: DSparkServer
    server_version = "dspark-hf"
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:
        logger.info("%s - %s", self.address_string(), format % args)

    def _refused(self, post: bool) -> bool:
        """Answers and returns True when the request fails the access checks (key, host, origin, content type)."""
        server = self.server
        if server.api_key is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                self._error(HTTPStatus.UNAUTHORIZED, "A valid `Authorization: Bearer <api key>` header is required.",
                            "authentication_error")
                return True
        if server.loopback:
            host, origin = self.headers.get("Host", ""), self.headers.get("Origin")
            if _hostname(host) not in LOOPBACK_NAMES or (origin is not None and _hostname(origin) not in LOOPBACK_NAMES):
                self._error(HTTPStatus.FORBIDDEN, "This server answers loopback hosts and origins only.",
                            "permission_error")
                return True
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if post and content_type != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Send the body as `Content-Type: application/json`.")
            return True
        return False

    def do_GET(self) -> None:
        if self._refused(post=False):
            return
        if self.path.rstrip("/") != "/v1/models":
            return self._error(HTTPStatus.NOT_FOUND, f"No route GET {self.path}.")
        model = {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "dspark-hf"}
        self._json(HTTPStatus.OK, {"object": "list", "data": [model]})

    def do_POST(self) -> None:
        if self._refused(post=True):
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(HTTPStatus.NOT_FOUND, f"No route POST {self.path}.")
        try:
            parsed = self.server.parse_chat_request(self._read_json())
        except RequestError as error:
            return self._error(error.status, str(error))
        prompt_ids, params, stream, include_usage = parsed.prompt_ids, parsed.params, parsed.stream, parsed.include_usage
        if self.server.engine.num_waiting >= self.server.max_queued_requests:
            return self._error(HTTPStatus.TOO_MANY_REQUESTS, "Too many requests are waiting; retry shortly.",
                               "rate_limit_error")
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
        while not request.wait(timeout=0.5):
            if self._client_left():  # nobody will read the answer: free the request's slot in the batch
                self.server.engine.cancel(completion_id)
                request.wait()
                return
        if request.finish_reason == "error":
            logger.error("Request %s failed: %s", completion_id, request.error)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "The server failed on this request.", "server_error")
        self._json(HTTPStatus.OK, self.server.completion(completion_id, request))

    def _read_json(self):
        """The request body as JSON; a missing, malformed or oversized body is a [`RequestError`]."""
        header = self.headers.get("Content-Length")
        if header is None or not header.strip().isdigit():
            raise RequestError(f"A Content-Length header with the body's size in bytes is required, got {header!r}.")
        length = int(header)
        if not 0 < length <= MAX_BODY_BYTES:
            raise RequestError(f"A JSON body of 1 to {MAX_BODY_BYTES} bytes is required, got {length}.")
        data = self.rfile.read(length)
        if len(data) < length:
            raise RequestError(f"The body ended after {len(data)} of the {length} bytes its Content-Length announced.")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"Invalid JSON: {error}") from error
        except RecursionError as error:
            raise RequestError("Invalid JSON: nested too deeply.") from error

    def _client_left(self) -> bool:
        """True once the client closed its side of the connection (a readable socket with no data)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

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
                logger.error("Request %s failed: %s", completion_id, request.error)
                self._event({"error": {"message": "The server failed on this request.", "type": "server_error"}})
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
