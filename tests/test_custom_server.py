"""examples/custom_server.py answers real HTTP clients (urllib / http.client) on the bundled model."""

from __future__ import annotations

import http.client
import importlib.util
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

KEY = "test-key-123"


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "custom_server.py"
    spec = importlib.util.spec_from_file_location("custom_server_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(bundled_engine):
    srv = _load_example().make_server(bundled_engine, port=0, api_key=KEY)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, path, body=None, key=KEY, method=None):
    host, port = server.server_address[:2]
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(server, path, body):
    """POST with stream=true; the parsed `data:` events (the last one is '[DONE]')."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("POST", path, json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = []
    for line in resp:  # http.client undoes the chunked transfer encoding
        line = line.decode().strip()
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return events


def test_binds_to_localhost_by_default(bundled_engine):
    srv = _load_example().make_server(bundled_engine, port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_api_key_is_required_when_set(server):
    assert call(server, "/health", key=None) == (200, {"status": "ok"})
    for key in (None, "wrong"):
        status, body = call(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, key=key)
        assert status == 401 and "API key" in body["error"]["message"]
        assert call(server, "/v1/models", key=key)[0] == 401
    status, body = call(server, "/v1/models")
    assert status == 200 and body["data"][0]["id"]


def test_completion_matches_the_engine(server, bundled_engine):
    params = {"temperature": 0, "max_new_tokens": 12}
    want = bundled_engine.generate("The capital of France is", params)
    status, body = call(server, "/v1/completions",
                        {"model": "x", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
                         "logprobs": 2})
    assert status == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == want["text"] and choice["finish_reason"] == want["meta_info"]["finish_reason"]["type"]
    assert body["usage"]["completion_tokens"] == len(want["output_ids"])
    assert len(choice["logprobs"]["token_logprobs"]) == len(want["output_ids"])
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])


def test_chat_stream_equals_the_non_streamed_answer(server):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
            "temperature": 0}
    status, full = call(server, "/v1/chat/completions", body)
    assert status == 200 and full["choices"][0]["message"]["role"] == "assistant"
    events = stream(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_streamed_completions_with_several_samples(server):
    events = stream(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "n": 2, "seed": 1})
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert all(texts.values())


def test_json_response_format(server):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    status, body = call(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Capital of France as JSON?"}], "max_tokens": 24,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}})
    assert status == 200
    assert json.loads(body["choices"][0]["message"]["content"])["city"] in ("Paris", "Rome")


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    status, body = call(server, "/v1/completions", {"prompt": "Hi", "temperature": -1})
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body = call(server, "/v1/chat/completions", {"messages": "hello"})
    assert status == 400 and "messages" in body["error"]["message"]
    assert call(server, "/v1/nothing", {})[0] == 404
    assert call(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_a_client_leaving_mid_stream_aborts_its_request(server, bundled_engine):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    conn.sock.close()  # go away
    conn.close()
    deadline = time.time() + 30
    while bundled_engine.get_server_info()["num_running"] and time.time() < deadline:
        time.sleep(0.2)
    assert bundled_engine.get_server_info()["num_running"] == 0
