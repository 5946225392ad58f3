"""`dspark-hf serve`: a real HTTP client against the OpenAI-compatible endpoint, started in-process."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import briefly_train, make_target, make_tokenizer

from dspark_hf import DSparkDraftModel
from dspark_hf.cli import build_parser
from dspark_hf.cli.serve import make_server
from dspark_hf.engine.server import DSparkServer
from dspark_hf.scheduling import CostTable

VOCAB = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny target, tokenizer, trained draft and cost table saved to disk and served as `dspark-hf serve` would."""
    folder = tmp_path_factory.mktemp("serve")
    target, tokenizer = make_target("llama", vocab_size=VOCAB), make_tokenizer(VOCAB)
    target.save_pretrained(folder / "target")
    tokenizer.save_pretrained(folder / "target")
    torch.manual_seed(1)
    draft = DSparkDraftModel.from_target(target, block_size=6, markov_rank=16, num_hidden_layers=1, mask_token_id=VOCAB - 1)
    briefly_train(draft.eval(), target, steps=60, batch=16).save_pretrained(folder / "draft")
    CostTable([1, 4, 16, 64], [100.0, 80.0, 35.0, 10.0]).save(folder / "cost.json")
    args = build_parser().parse_args([
        "serve", "--target", str(folder / "target"), "--target-dtype", "float32", "--draft", str(folder / "draft"),
        "--scheduler", "prefix", "--cost-table", str(folder / "cost.json"), "--port", "0", "--model-name", "tiny",
    ])
    server = make_server(args).start()
    yield server, target, tokenizer
    server.close()


def post(server, body, path="/v1/chat/completions"):
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers, response.read().decode()


def events(text: str) -> list:
    """The `data:` payloads of a server-sent event stream (JSON-decoded, except `[DONE]`)."""
    payloads = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def expected_reply(target, tokenizer, content, max_tokens):
    """Greedy plain `generate` on the rendered chat, stopped at the end token: (text, completion tokens, reason)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, return_dict=True)
    prompt = torch.tensor([ids["input_ids"]])
    eos = tokenizer.eos_token_id
    out = target.generate(prompt, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, prompt.shape[1]:].tolist()
    reason = "stop" if tokens[-1] == eos else "length"
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), reason


def test_models_endpoint(served):
    server, _, _ = served
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as response:
        data = json.loads(response.read())
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]


@pytest.mark.parametrize("content", ["w1 w2 w3", "w5", "w9 w4"])
def test_chat_completion_matches_plain_generate(served, content):
    server, target, tokenizer = served
    status, headers, text = post(server, {"model": "tiny", "messages": [{"role": "user", "content": content}],
                                          "temperature": 0, "max_tokens": 24})
    body = json.loads(text)
    expected, completion_tokens, reason = expected_reply(target, tokenizer, content, 24)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] == reason
    assert body["usage"]["completion_tokens"] == completion_tokens
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + completion_tokens


def test_streaming_chat_completion(served):
    server, target, tokenizer = served
    messages = [{"role": "user", "content": [{"type": "text", "text": "w1 w2"}, {"type": "text", "text": " w3"}]}]
    status, headers, text = post(server, {"messages": messages, "temperature": 0, "max_tokens": 30, "stream": True,
                                          "stream_options": {"include_usage": True}})
    chunks = events(text)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    expected, completion_tokens, reason = expected_reply(target, tokenizer, "w1 w2 w3", 30)
    assert content == expected
    assert chunks[-3]["choices"][0]["finish_reason"] == reason
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == completion_tokens
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks[:-1]) > 1  # streamed


def test_concurrent_clients_share_the_engine(served):
    server, target, tokenizer = served
    contents = ["w1 w2 w3", "w7", "w3 w3", "w11 w12", "w20"]
    results = {}

    def client(content, stream):
        body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 20, "stream": stream}
        _, _, text = post(server, body)
        if stream:
            results[content] = "".join(c["choices"][0]["delta"].get("content", "") for c in events(text)[:-1])
        else:
            results[content] = json.loads(text)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(c, i % 2 == 0)) for i, c in enumerate(contents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {c: expected_reply(target, tokenizer, c, 20)[0] for c in contents}


def test_sampling_request(served):
    server, _, _ = served
    _, _, text = post(server, {"messages": [{"role": "user", "content": "w3"}], "temperature": 0.8, "top_p": 0.9,
                               "top_k": 20, "max_tokens": 8, "stop": ["w99"]})
    body = json.loads(text)
    assert 1 <= body["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize(
    "body, status, match",
    [
        ("not json", 400, "Invalid JSON"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user"}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": "w1"}], "n": 2}, 400, "n=1"),
        ({"messages": [{"role": "user", "content": "w1"}], "top_p": 2.0}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "w1"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "w1"}], "temperature": 1e-50}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "w1"}], "temperature": 1e308}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "w1"}], "temperature": -0.5}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "w1"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "w1"}], "temperature": 1, "top_k": 9223372036854775813}, 400, "top_k"),
        ({"messages": [{"role": "user", "content": "w1"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "w1"}], "max_tokens": True}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "w1"}], "max_tokens": 10**30}, 400, "context window"),
        ({"messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": 1.5}, 400, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "w1"}], "stream": "false"}, 400, "stream"),
        ({"messages": [{"role": "user", "content": "w1"}], "logprobs": True}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": "w1"}], "model": "gpt-9"}, 404, "gpt-9"),
        ('{"messages": [{"role": "user", "content": "w1 \\ud800"}]}', 400, "surrogate"),
        ('{"messages": [{"role": "user", "content": "w1"}], "temperature": NaN}', 400, "temperature"),
        ("[" * 100_000, 400, "Invalid JSON"),
    ],
)
def test_bad_requests(served, body, status, match):
    server, _, _ = served
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == status and match in json.loads(error.value.read())["error"]["message"]


def spy_on_cancel(server, monkeypatch) -> threading.Event:
    """An event set once the engine has cancelled a request (its `cancel` still runs)."""
    cancelled = threading.Event()
    original = server.engine.cancel

    def spy(request_id):
        result = original(request_id)
        cancelled.set()
        return result

    monkeypatch.setattr(server.engine, "cancel", spy)
    return cancelled


def raw_request(server, head: bytes, body: bytes = b"", close_write: bool = False) -> bytes:
    """Sends `head` + `body` on a fresh connection and returns everything the server answers."""
    with socket.create_connection(server.server_address[:2], timeout=60) as connection:
        connection.sendall(head + body)
        if close_write:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize(
    "length, close_write, match",
    [("abc", False, b"Content-Length"), ("100", True, b"ended after"), (None, False, b"Content-Length")],
)
def test_malformed_content_length_is_a_clear_400(served, length, close_write, match):
    server, _, _ = served
    body = json.dumps({"messages": [{"role": "user", "content": "w1"}]}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n".encode()
    answer = raw_request(server, head + b"Connection: close\r\n\r\n", body[:20] if close_write else b"", close_write)
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert match in answer


def test_a_long_prompt_is_refused_with_the_cap(served):
    server, _, _ = served
    server.limits.max_prompt_tokens = 8
    try:
        with pytest.raises(ValueError, match="accepts fewer than 8"):
            server.parse_chat_request({"messages": [{"role": "user", "content": " ".join(["w1"] * 20)}]})
    finally:
        server.limits.max_prompt_tokens = None


def test_disconnected_non_streaming_request_is_cancelled(served, monkeypatch):
    server, _, _ = served
    cancelled = spy_on_cancel(server, monkeypatch)
    step = server.engine.step

    def slow_step():  # keeps the request running well past the handler's first check for a departed client
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    body = json.dumps({"messages": [{"role": "user", "content": "w1 w2"}], "temperature": 0, "max_tokens": 400}).encode()
    with socket.create_connection(server.server_address[:2], timeout=30) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
    assert cancelled.wait(timeout=60)


@pytest.fixture
def plain_server():
    """A second server over an engine without a draft, with an API key, for access and failure checks."""
    from dspark_hf.engine import DSparkEngine

    target, tokenizer = make_target("llama", vocab_size=VOCAB), make_tokenizer(VOCAB)
    server = DSparkServer(DSparkEngine(target, tokenizer=tokenizer), model_name="tiny", port=0, api_key="s3cret")
    yield server.start()
    server.close()


def request_status(server, headers: dict, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body or {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 2}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_api_key_origin_and_content_type_checks(plain_server):
    json_type = {"Content-Type": "application/json"}
    key = {"Authorization": "Bearer s3cret"}
    assert request_status(plain_server, json_type)[0] == 401
    assert request_status(plain_server, json_type | {"Authorization": "Bearer wrong"})[0] == 401
    assert request_status(plain_server, json_type | key)[0] == 200
    assert request_status(plain_server, json_type | key | {"Origin": "http://evil.example"})[0] == 403
    assert request_status(plain_server, json_type | key | {"Origin": "http://localhost:3000"})[0] == 200
    assert request_status(plain_server, json_type | key | {"Host": "evil.example"})[0] == 403
    assert request_status(plain_server, {"Content-Type": "text/plain"} | key)[0] == 415


def test_a_failing_request_gets_a_500_without_internals(plain_server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(plain_server.engine, "_prefill", broken)
    status, body = request_status(plain_server, {"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
    assert status == 500 and "secret" not in json.dumps(body)
    assert body["error"]["type"] == "server_error"


def test_connection_and_queue_caps_answer_503_and_429():
    from dspark_hf.engine import DSparkEngine

    target, tokenizer = make_target("llama", vocab_size=VOCAB), make_tokenizer(VOCAB)
    server = DSparkServer(DSparkEngine(target, tokenizer=tokenizer), port=0, max_connections=1, max_queued_requests=0)
    server.start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=30) as idle:  # holds the only slot
            idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers not finished yet
            time.sleep(0.2)
            answer = raw_request(server, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After" in answer
        deadline = time.time() + 30
        while True:  # the slot is free again once the idle connection's thread ends
            status, body = request_status(server, {"Content-Type": "application/json"})
            if status != 503 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"  # no request may wait
    finally:
        server.close()


def test_binding_beyond_loopback_without_a_key_warns(caplog):
    from dspark_hf.engine import DSparkEngine

    target, tokenizer = make_target("llama", vocab_size=VOCAB), make_tokenizer(VOCAB)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            server = DSparkServer(DSparkEngine(target, tokenizer=tokenizer), host="0.0.0.0", port=0)
            server.server_close()
    finally:
        hf_logging.disable_propagation()
    assert "without an API key" in caplog.text
    assert server.request_queue_size >= 128


def test_unknown_route(served):
    server, _, _ = served
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.url + "/v1/completions", timeout=30)
    assert error.value.code == 404


def test_disconnected_stream_is_cancelled(served, monkeypatch):
    """A client that goes away mid-stream frees its slot: the handler cancels its request."""
    server, _, _ = served
    cancelled = spy_on_cancel(server, monkeypatch)
    body = json.dumps({"messages": [{"role": "user", "content": "w1 w2 w3"}], "temperature": 0, "max_tokens": 400,
                       "stream": True}).encode()
    with socket.create_connection(server.server_address[:2], timeout=30) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        received = b""
        while b"data: " not in received:  # headers and the first event may arrive in separate packets
            chunk = connection.recv(4096)
            assert chunk, f"connection closed before the first event: {received!r}"
            received += chunk
    assert cancelled.wait(timeout=60)
    while server.engine.has_unfinished():
        cancelled.wait(0.05)
    assert server.engine.stats.finished_requests > 0


def test_server_needs_a_chat_template():
    from dspark_hf.engine import DSparkEngine

    target = make_target("llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="chat template"):
        DSparkServer(DSparkEngine(target), port=0)


def test_serve_profiles_the_engine_shapes_when_no_cost_table_is_given(tmp_path):
    """Without --cost-table, start-up profiles R rows × width verification and the draft pass, within the batch limit."""
    from dspark_hf.cli.serve import build_engine

    target = make_target("llama", vocab_size=VOCAB)
    target.save_pretrained(tmp_path / "target")
    make_tokenizer(VOCAB).save_pretrained(tmp_path / "target")
    DSparkDraftModel.from_target(target, block_size=3, num_hidden_layers=1, mask_token_id=VOCAB - 1).save_pretrained(
        tmp_path / "draft"
    )
    args = build_parser().parse_args([
        "serve", "--target", str(tmp_path / "target"), "--target-dtype", "float32", "--draft", str(tmp_path / "draft"),
        "--scheduler", "prefix", "--max-batch-size", "4", "--max-draft-tokens", "2",
    ])
    table = build_engine(args).policy.cost_table
    assert table.requests == [1, 2, 4] and table.batch_tokens == [1, 2, 3]
    assert table.draft_requests == [1, 2, 4] and table.has_draft_cost
