"""A stub OpenAI-compatible chat-completions endpoint on 127.0.0.1, for the judge-scored benchmarks' tests.

`StubEndpoint` is a real HTTP server in a thread: the ``openai`` client (ours, and lmms-eval's own when its
environment points at the stub) talks to it over a socket. It records every request body and answers with
``reply(body)``: a string (the message content), None (a message without content) or an int (that HTTP error).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | int | None


class StubEndpoint:
    """The stub's state: the recorded request bodies and the reply policy."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1"
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.reply: Callable[[dict[str, Any]], Reply] = lambda body: "8 7\nBoth fine."

    def prompt(self, index: int) -> str:
        return self.requests[index]["messages"][-1]["content"]


def by_marker(replies: Mapping[str, Reply | Callable[[float], Reply]]) -> Callable[[dict[str, Any]], Reply]:
    """A reply policy: the value of the first key found in the prompt (a callable value gets the temperature)."""

    def reply(body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        for marker, value in replies.items():
            if marker in prompt:
                return value(body.get("temperature", 0.0)) if callable(value) else value
        raise AssertionError(f"stub: no canned reply for prompt ending {prompt[-80:]!r}")

    return reply


def _handler(endpoint: StubEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            endpoint.requests.append(body)
            endpoint.paths.append(self.path)
            reply = endpoint.reply(body)
            if isinstance(reply, int):
                message = "Rate limit reached for requests" if reply == 429 else "stub error"
                self._send(reply, {"error": {"message": message, "type": "stub", "code": str(reply)}})
                return
            self._send(
                200,
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": 0,
                    "model": f"{body['model']}-served",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                },
            )

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def stub_endpoint() -> Iterator[StubEndpoint]:
    """Serve a `StubEndpoint` on a free port of 127.0.0.1 for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    endpoint = StubEndpoint(server.server_address[1])
    server.RequestHandlerClass = _handler(endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
