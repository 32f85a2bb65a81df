"""A bounded load test of ``llavakit serve`` run as its own process: 64 concurrent requests (streaming and not,
some invalid) per round, twice. No valid request fails, every invalid one gets its 4xx, and the second round
leaves the server's resident memory within 10% of where the first left it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from serving_fixtures import data_url, png_bytes

pytestmark = pytest.mark.slow

CONCURRENT = 64
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_process(checkpoint, tmp_path_factory):
    """``llavakit serve`` as a subprocess on 127.0.0.1; yields (process, base URL)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        str(Path(sys.executable).parent / "llavakit"),
        "serve",
        "--model",
        f"tiny={checkpoint}",
        "--port",
        str(port),
        "--max-images-per-request",
        "2",
        "--log-level",
        "warning",
    ]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"llavakit serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llavakit serve did not answer /health within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield process, f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


PICTURES = [
    png_bytes((32 + 4 * index, 40 - 2 * index), colour)
    for index, colour in enumerate(["red", "blue", "green", "orange"])
]


def valid_request(index: int) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(PICTURES[index % len(PICTURES)])}},
        {"type": "text", "text": f"What is in picture {index}?"},
    ]
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


INVALID = [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    (
        {
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                }
            ],
        },
        400,
    ),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, 400),
    (
        {
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(PICTURES[0])}}] * 3,
                }
            ],
        },
        400,
    ),
]


async def run_round(base_url: str) -> tuple[int, int, list[str]]:
    """One round; returns (valid answered, invalid refused as expected, problems)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    problems: list[str] = []

    async def valid(index: int) -> bool:
        body = valid_request(index)
        try:
            if index % 2:
                stream = await client.chat.completions.create(**body, stream=True)
                reasons = [
                    choice.finish_reason
                    async for chunk in stream
                    for choice in chunk.choices
                    if choice.finish_reason
                ]
                ok = reasons in (["stop"], ["length"])
            else:
                response = await client.chat.completions.create(**body)
                ok = response.choices[0].finish_reason in ("stop", "length")
        except openai.APIError as err:
            problems.append(f"valid request {index} failed: {err}")
            return False
        if not ok:
            problems.append(f"valid request {index} ended without a finish reason")
        return ok

    async def invalid(index: int) -> bool:
        body, status = INVALID[index % len(INVALID)]
        try:
            await client.chat.completions.create(**body, stream=bool(index % 2))
        except openai.APIStatusError as err:
            if err.status_code == status and err.body and err.body.get("message"):
                return True
            problems.append(f"invalid request {index}: status {err.status_code}, body {err.body}")
            return False
        problems.append(f"invalid request {index} was answered")
        return False

    kinds = [invalid if index % 4 == 3 else valid for index in range(CONCURRENT)]
    results = await asyncio.gather(*(kind(index) for index, kind in enumerate(kinds)))
    await client.close()
    valid_ok = sum(ok for ok, kind in zip(results, kinds) if kind is valid)
    invalid_ok = sum(ok for ok, kind in zip(results, kinds) if kind is invalid)
    return valid_ok, invalid_ok, problems


def test_64_concurrent_requests_twice_without_failures_or_leaks(served_process):
    process, base_url = served_process
    server = psutil.Process(process.pid)
    rss = []
    for _ in range(2):
        valid_ok, invalid_ok, problems = asyncio.run(run_round(base_url))
        assert problems == []
        assert (valid_ok, invalid_ok) == (48, 16)
        rss.append(server.memory_info().rss)
    assert process.poll() is None
    assert rss[1] <= 1.10 * rss[0], (
        f"resident memory grew from {rss[0] / 2**20:.0f} to {rss[1] / 2**20:.0f} MiB"
    )
