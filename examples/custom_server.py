"""A small OpenAI-style HTTP server on top of the Engine, standard library only.

    python examples/custom_server.py --port 8000                  # the bundled model, 127.0.0.1:8000
    python examples/custom_server.py --model-path /path/to/hf-dir --api-key secret

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "The capital of France is", "max_tokens": 16}'
    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer secret' \\
        -d '{"messages": [{"role": "user", "content": "Hi!"}], "stream": true}'

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with server-sent events
when "stream": true), GET /v1/models, GET /health. With --api-key (or the PIPELINE_INFER_API_KEY
environment variable) every /v1 route needs `Authorization: Bearer <key>`. The server binds to
127.0.0.1 unless told otherwise: pass --host 0.0.0.0 only behind something that guards it.

The Engine is thread-safe: each HTTP request runs on its own thread (ThreadingHTTPServer) and
calls the synchronous API; the engine batches what arrives concurrently. A client that goes away
mid-stream aborts its request, which frees its KV cache.

Request fields understood: model (ignored: one model), prompt (a string or a list) / messages,
max_tokens (max_completion_tokens), temperature, top_p, top_k, min_p, n, stop, seed,
frequency_penalty, presence_penalty, repetition_penalty, logprobs (completions: how many top
entries; chat: true) and top_logprobs (chat), response_format ({"type": "json_object"} or
{"type": "json_schema", "json_schema": {"schema": ...}}), stream.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

# OpenAI request field -> sampling parameter (same meaning, maybe another name).
_PARAMS = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "n": "n",
    "stop": "stop",
    "seed": "sampling_seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "regex": "regex",
    "ebnf": "ebnf",
    "json_schema": "json_schema",
}


class BadRequest(ValueError):
    """A client error: answered with 400 and the message."""


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_name: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server for `engine` (call serve_forever(); port 0 picks a free port)."""
    name = model_name or os.path.basename(os.path.normpath(engine.model_dir))

    class Handler(_Handler):
        pass

    Handler.engine, Handler.api_key, Handler.model_name = engine, api_key, name
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    engine: Any = None
    api_key: str | None = None
    model_name = "model"

    # --- routing -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path == "/health":
            return self._json(HTTPStatus.OK, {"status": "ok"})
        if not self._authorized():
            return
        if self.path == "/v1/models":
            return self._json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pipeline-infer"}]})
        self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}")

    def do_POST(self) -> None:
        if not self._authorized():
            return
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        route = routes.get(self.path)
        if route is None:
            self._drain_body()
            return self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}")
        try:
            body = self._body()
            route(body)
        except (BadRequest, ValueError, TypeError) as exc:  # the engine's errors name the bad value
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; a stream's generator aborted its request

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default; --verbose turns it on
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    # --- endpoints ---------------------------------------------------------------------------
    def _completions(self, body: dict) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("'prompt' must be a string or a non-empty list of strings")
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise BadRequest(f"'logprobs' must be an integer >= 0 for /v1/completions, got {logprobs!r}")
        params = _sampling_params(body, default_max_tokens=16)
        extra = dict(return_logprob=True, top_logprobs_num=logprobs, return_text_in_logprobs=True) \
            if logprobs is not None else {}
        self._respond("text_completion", prompts, params, extra, bool(body.get("stream")), _completion_choice)

    def _chat(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise BadRequest("'messages' must be a non-empty list of {'role': str, 'content': str}")
        if self.engine.tokenizer is None:
            raise BadRequest("this model has no tokenizer, so no chat template")
        prompt = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        extra = {}
        if body.get("logprobs"):
            extra = dict(return_logprob=True, top_logprobs_num=int(body.get("top_logprobs") or 0),
                         return_text_in_logprobs=True)
        params = _sampling_params(body, default_max_tokens=None)
        self._respond("chat.completion", [prompt], params, extra, bool(body.get("stream")), _chat_choice)

    def _respond(self, kind: str, prompts: list[str], params: dict, extra: dict, stream: bool, choice) -> None:
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name}
        single = len(prompts) == 1 and params.get("n", 1) == 1
        if not stream:
            outs = self.engine.generate(prompts[0] if single else prompts, params, **extra)
            outs = [outs] if single else outs
            choices = [choice(i, out, None) for i, out in enumerate(outs)]
            n = params.get("n", 1)
            prompt_tokens = sum(out["meta_info"]["prompt_tokens"] for out in outs[::n])
            completion_tokens = sum(out["meta_info"]["completion_tokens"] for out in outs)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            return self._json(HTTPStatus.OK, {**head, "choices": choices, "usage": usage})
        chunks = self.engine.generate(prompts[0] if single else prompts, params, stream=True, **extra)
        self._stream({**head, "object": kind + (".chunk" if kind == "chat.completion" else "")},
                     chunks, choice, incremental=self.engine.config.incremental_streaming_output)

    def _stream(self, head: dict, chunks: Iterator[dict], choice, incremental: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent: dict[int, tuple[int, int]] = {}  # index -> (characters, tokens) already sent
        try:
            for chunk in chunks:
                i = chunk.get("index", 0)
                text_sent, ids_sent = sent.get(i, (0, 0))
                if incremental:
                    delta = chunk
                else:  # chunks carry everything so far: send what is new
                    meta = dict(chunk["meta_info"])
                    for key in ("output_token_logprobs", "output_top_logprobs"):
                        if key in meta:
                            meta[key] = meta[key][ids_sent:]
                    delta = {"text": chunk["text"][text_sent:], "output_ids": chunk["output_ids"][ids_sent:],
                             "meta_info": meta}
                sent[i] = (text_sent + len(delta["text"]), ids_sent + len(delta["output_ids"]))
                first = (text_sent, ids_sent) == (0, 0)
                finish = chunk["meta_info"]["finish_reason"]
                if delta["text"] or finish is not None or first:
                    self._write_chunk(f"data: {json.dumps({**head, 'choices': [choice(i, delta, first, streaming=True)]})}\n\n")
            self._write_chunk("data: [DONE]\n\n")
            self._write_chunk("")  # the terminating zero-length chunk
        finally:
            chunks.close()  # a client that went away aborts its requests

    # --- plumbing ------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        if not self.api_key:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode()):
            return True
        self._drain_body()
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return False

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
            status.value, "server_error")
        self._json(status, {"error": {"message": message, "type": kind, "code": status.value}})

    def _write_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _sampling_params(body: dict, default_max_tokens: int | None) -> dict:
    params = {ours: body[theirs] for theirs, ours in _PARAMS.items() if body.get(theirs) is not None}
    if "max_new_tokens" not in params and default_max_tokens is not None:
        params["max_new_tokens"] = default_max_tokens
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            params["json_schema"] = json.dumps({"type": "object"})
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("response_format json_schema needs {'json_schema': {'schema': {...}}}")
            params["json_schema"] = json.dumps(schema)
        elif kind != "text":
            raise BadRequest(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    return params


def _finish(out: dict) -> str | None:
    reason = out["meta_info"]["finish_reason"]
    return None if reason is None else reason["type"]


def _completion_choice(i: int, out: dict, first: bool | None, streaming: bool = False) -> dict:
    choice = {"index": i, "text": out["text"], "finish_reason": _finish(out), "logprobs": None}
    entries = out["meta_info"].get("output_token_logprobs")
    if entries is not None:
        tops = out["meta_info"].get("output_top_logprobs")
        choice["logprobs"] = {
            "tokens": [t for _, _, t in entries],
            "token_logprobs": [lp for lp, _, _ in entries],
            "top_logprobs": [{t: lp for lp, _, t in top} for top in tops] if tops else None,
        }
    return choice


def _chat_choice(i: int, out: dict, first: bool | None, streaming: bool = False) -> dict:
    message = {"role": "assistant", "content": out["text"]}
    if streaming:
        message = message if first else {"content": out["text"]}
    choice = {"index": i, ("delta" if streaming else "message"): message, "finish_reason": _finish(out),
              "logprobs": None}
    entries = out["meta_info"].get("output_token_logprobs")
    if entries is not None:
        tops = out["meta_info"].get("output_top_logprobs") or [[] for _ in entries]
        choice["logprobs"] = {"content": [
            {"token": t, "logprob": lp, "top_logprobs": [{"token": tt, "logprob": tlp} for tlp, _, tt in top]}
            for (lp, _, t), top in zip(entries, tops)
        ]}
    return choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None, help="Hugging Face directory or hub id (default: the bundled model)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("PIPELINE_INFER_API_KEY"),
                    help="require 'Authorization: Bearer <key>' (default: $PIPELINE_INFER_API_KEY, else none)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--verbose", action="store_true", help="log every HTTP request")
    args = ap.parse_args()

    import pipeline_infer as sgl

    engine = sgl.Engine(model_path=args.model_path)
    server = make_server(engine, args.host, args.port, args.api_key, args.served_model_name)
    server.verbose = args.verbose
    host, port = server.server_address[:2]
    print(f"serving {server.RequestHandlerClass.model_name} on http://{host}:{port}"
          + (" (API key required)" if args.api_key else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.shutdown()


if __name__ == "__main__":
    main()
