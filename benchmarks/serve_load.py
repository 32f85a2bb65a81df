"""Serving throughput and latency: ``llavakit serve`` (its own process) under 1, 8 and 64 concurrent clients.

On the demo's model (`llavakit.demo.parts`, random weights, so answers run to ``--max-tokens`` unless the model
happens to emit its stop token; or ``--model DIR``), every client sends one image question at a time as a streamed
chat completion (``temperature 0``, ``stream_options.include_usage`` for the token count) and measures the time to
the first text chunk (TTFT) and to the end. Printed:

1. for 1, 8 and 64 concurrent clients: requests/s, generated tokens/s, TTFT p50 / p99;
2. throughput ratio, 64 concurrent clients against one client sending the same requests one after another
   (target ≥ 4× on 2 CPU cores); A (sequential) and B (64 concurrent) alternate ``--rounds`` times, the ratio is
   taken pair by pair and its median reported;
3. single-request latency against a bare `Assistant.generate` call in this process for the same answer
   (target ≤ 1.2×), alternating, median of the pairwise ratios;
4. the image-feature cache: the per-turn latency of a 4-turn chat about one image on a server with the cache and
   on one without it (``--feature-cache-mb 0``), alternating chats.

The servers are started by this script on 127.0.0.1 and stopped at the end. Not a test: run
``python benchmarks/serve_load.py [--rounds 3] [--requests 64] [--max-tokens 64] [--model DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import openai  # noqa: E402
from eval_throughput import demo_checkpoint  # noqa: E402  (the same demo-sized checkpoint; benchmarks/ is on sys.path)
from PIL import Image, ImageDraw  # noqa: E402


def picture(index: int) -> bytes:
    """A distinct 96-160 px scene per index (PNG)."""
    width, height = 96 + (index * 7) % 64, 96 + (index * 11) % 64
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colour = ["red", "blue", "green", "orange", "purple"][index % 5]
    draw.ellipse((10 + index % 20, 10, width // 2 + 10, height // 2 + 10), fill=colour)
    draw.text((width // 2, height - 20), f"w{index}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def question(index: int) -> list[dict]:
    return [
        {"type": "image_url", "image_url": {"url": data_url(picture(index))}},
        {"type": "text", "text": "What colour is the shape?"},
    ]


@contextmanager
def server(checkpoint: Path, *flags: str):
    """``llavakit serve`` on a free loopback port; yields its OpenAI base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "llavakit"), "serve", "--model", f"demo={checkpoint}"]
    process = subprocess.Popen([*command, "--port", str(port), "--log-level", "warning", *flags])
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the server did not start")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def one_request(client: openai.AsyncOpenAI, index: int, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, total s, generated tokens) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": question(index)}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


async def load_round(base_url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``requests`` requests from ``clients`` concurrent clients (each sends its next request when one ends)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    pending = list(range(requests))
    results: list[tuple[float, float, int]] = []

    async def worker() -> None:
        while pending:
            results.append(await one_request(client, pending.pop(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    ttfts = sorted(result[0] for result in results)
    return {
        "requests_per_s": requests / elapsed,
        "tokens_per_s": sum(result[2] for result in results) / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "mean_tokens": sum(result[2] for result in results) / requests,
    }


def show(label: str, row: dict[str, float]) -> None:
    print(
        f"  {label:<24} {row['requests_per_s']:7.2f} req/s  {row['tokens_per_s']:8.1f} tok/s  "
        f"TTFT p50 {row['ttft_p50'] * 1000:7.0f} ms  p99 {row['ttft_p99'] * 1000:7.0f} ms  "
        f"({row['mean_tokens']:.1f} tokens/answer)",
        flush=True,
    )


def concurrency(base_url: str, args: argparse.Namespace) -> None:
    print("throughput by concurrent clients:")
    asyncio.run(load_round(base_url, 8, 8, args.max_tokens))  # warm-up
    for clients in (1, 8, 64):
        requests = args.requests if clients > 1 else max(8, args.requests // 8)
        show(
            f"{clients} client(s), {requests} req",
            asyncio.run(load_round(base_url, clients, requests, args.max_tokens)),
        )
    ratios = []
    for round_number in range(args.rounds):
        sequential = asyncio.run(load_round(base_url, 1, args.requests, args.max_tokens))
        concurrent = asyncio.run(load_round(base_url, 64, args.requests, args.max_tokens))
        ratios.append(concurrent["tokens_per_s"] / sequential["tokens_per_s"])
        print(
            f"  round {round_number + 1}: sequential {sequential['tokens_per_s']:.1f} tok/s, 64 concurrent "
            f"{concurrent['tokens_per_s']:.1f} tok/s, ratio {ratios[-1]:.2f}x",
            flush=True,
        )
    print(f"64-concurrent / sequential throughput: median {statistics.median(ratios):.2f}x (target >= 4x)")


def single_latency(base_url: str, checkpoint: Path, args: argparse.Namespace) -> None:
    import llavakit

    assistant = llavakit.load(checkpoint, device="cpu")
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    ratios = []
    for round_number in range(args.rounds * 3):
        index = 1000 + round_number
        start = time.perf_counter()
        served = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": question(index)}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        server_s = time.perf_counter() - start
        start = time.perf_counter()
        (bare,) = assistant.generate(
            ["<image>\nWhat colour is the shape?"], [[picture(index)]], max_new_tokens=args.max_tokens
        )
        bare_s = time.perf_counter() - start
        assert bare == served.choices[0].message.content, "the server and the Python API answered differently"
        ratios.append(server_s / bare_s)
        print(
            f"  request {round_number + 1}: server {server_s * 1000:.0f} ms, Assistant.generate {bare_s * 1000:.0f} ms "
            f"({served.usage.completion_tokens} tokens), ratio {ratios[-1]:.2f}",
            flush=True,
        )
    print(
        f"single request / bare Assistant.generate latency: median {statistics.median(ratios):.2f}x (target <= 1.2x)"
    )


def chat_turns(base_url: str, index: int, max_tokens: int) -> list[float]:
    """Per-turn latency (s) of a 4-turn chat about one new image."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": question(index)}]
    latencies = []
    for turn in range(4):
        start = time.perf_counter()
        answer = client.chat.completions.create(
            model="demo", messages=messages, max_tokens=max_tokens, temperature=0
        )
        latencies.append(time.perf_counter() - start)
        messages += [
            {"role": "assistant", "content": answer.choices[0].message.content or "ok"},
            {"role": "user", "content": f"And what about detail {turn}?"},
        ]
    return latencies


def feature_cache(cached_url: str, uncached_url: str, args: argparse.Namespace) -> None:
    print("4-turn image chat, per-turn latency (ms), with / without the image-feature cache:")
    chat_turns(cached_url, 5000, args.chat_tokens)
    chat_turns(uncached_url, 5000, args.chat_tokens)  # warm-up both
    with_cache, without = [], []
    for round_number in range(args.rounds):
        with_cache.append(chat_turns(cached_url, 6000 + round_number, args.chat_tokens))
        without.append(chat_turns(uncached_url, 6000 + round_number, args.chat_tokens))
    for turn in range(4):
        a = statistics.median(run[turn] for run in with_cache) * 1000
        b = statistics.median(run[turn] for run in without) * 1000
        print(f"  turn {turn + 1}: {a:7.1f} with / {b:7.1f} without  ({b / a:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: the demo model, random weights)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chat-tokens", type=int, default=8, help="answer length in the feature-cache chats")
    parser.add_argument("--skip", nargs="*", default=[], choices=["concurrency", "latency", "cache"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model or demo_checkpoint(Path(tmp))
        with server(checkpoint) as base_url:
            if "concurrency" not in args.skip:
                concurrency(base_url, args)
            if "latency" not in args.skip:
                single_latency(base_url, checkpoint, args)
            if "cache" not in args.skip:
                with server(checkpoint, "--feature-cache-mb", "0") as uncached_url:
                    feature_cache(base_url, uncached_url, args)


if __name__ == "__main__":
    main()
