"""The server through the real `openai` client: answers equal `llavakit.load(...).generate`, streaming equals
non-streaming, sampling is seeded, several models, and every bad request gets its OpenAI-style 4xx."""

from __future__ import annotations

import concurrent.futures
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image
from serving_fixtures import data_url, png_bytes

import llavakit
from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.inference.prompts import Request

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """The same checkpoint through the Python API (transformers' generate loop, not the server's engine)."""
    return llavakit.load(checkpoint, device="cpu")


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def ask(client, content, model="tiny", **options):
    options.setdefault("max_tokens", MAX_TOKENS)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **options
    )


def streamed(client, messages, **options):
    """(text per choice, finish reason per choice, usage, number of chunks) of a streamed completion."""
    options.setdefault("max_tokens", MAX_TOKENS)
    options.setdefault("temperature", 0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, **options
    )
    texts, reasons, usage, chunks = {}, {}, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage, chunks


def test_image_answer_equals_the_python_api_and_counts_tokens(client, oracle, pictures):
    response = ask(client, [image_part(pictures[0]), {"type": "text", "text": "What colour is the circle?"}])
    expected = oracle.generate(
        ["<image>\nWhat colour is the circle?"], [[pictures[0]]], max_new_tokens=MAX_TOKENS
    )
    assert response.choices[0].message.content == expected[0] != ""
    assert response.choices[0].message.role == "assistant"
    prompt = oracle.prompts.encode(
        Request(Conversation((Turn(USER, "<image>\nWhat colour is the circle?"),)), (pictures[0],))
    )
    assert response.usage.prompt_tokens == len(prompt.input_ids)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    if response.choices[0].finish_reason == "length":
        assert response.usage.completion_tokens == MAX_TOKENS


def test_streaming_equals_non_streaming(client, pictures):
    messages = [
        {"role": "user", "content": [image_part(pictures[1]), {"type": "text", "text": "Describe it."}]}
    ]
    plain = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    texts, reasons, usage, chunks = streamed(client, messages)
    assert texts == {0: plain.choices[0].message.content}
    assert reasons == {0: plain.choices[0].finish_reason}
    assert usage.model_dump() == plain.usage.model_dump()
    assert chunks >= 3  # role chunk, at least one text delta, finish chunk (and the usage chunk)


def test_raw_stream_is_server_sent_events_ending_with_done(server, pictures):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_two_images_and_text_placed_where_the_parts_are(client, oracle, pictures):
    content = [image_part(pictures[0]), image_part(pictures[2]), {"type": "text", "text": "Which is bigger?"}]
    response = ask(client, content)
    expected = oracle.generate(
        ["<image>\n<image>\nWhich is bigger?"], [[pictures[0], pictures[2]]], max_new_tokens=MAX_TOKENS
    )
    assert response.choices[0].message.content == expected[0]


def test_multi_turn_with_the_image_in_an_earlier_turn_and_a_system_prompt(client, oracle, pictures):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [image_part(pictures[1]), {"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And its colour?"},
    ]
    response = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    conversation = Conversation(
        (
            Turn(USER, "<image>\nWhat shape is it?"),
            Turn(ASSISTANT, "A square."),
            Turn(USER, "And its colour?"),
        ),
        system="Answer briefly.",
    )
    (expected,) = oracle.generate_requests([Request(conversation, (pictures[1],))], max_new_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == expected


def test_seeded_sampling_with_n_choices_is_reproducible(client, pictures):
    content = [image_part(pictures[2]), {"type": "text", "text": "Tell me a story."}]
    first = ask(client, content, n=3, seed=7, temperature=1.5, top_p=0.95, max_tokens=12)
    again = ask(client, content, n=3, seed=7, temperature=1.5, top_p=0.95, max_tokens=12)
    other = ask(client, content, n=3, seed=8, temperature=1.5, top_p=0.95, max_tokens=12)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    assert texts != [choice.message.content for choice in other.choices]
    # every choice's tokens count (1 to 12 each), the prompt once
    assert 3 <= first.usage.completion_tokens <= 36 and first.usage.prompt_tokens < first.usage.total_tokens


def test_stop_strings_cut_the_answer(client, oracle):
    full = ask(client, "Hello there", max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the greedy answer is too short to pick a stop string from"
    response = ask(client, "Hello there", max_tokens=16, stop=[stop])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == full[: full.index(stop)].strip()
    texts, reasons, _, _ = streamed(
        client, [{"role": "user", "content": "Hello there"}], max_tokens=16, stop=stop
    )
    assert texts == {0: response.choices[0].message.content} and reasons == {0: "stop"}


def test_concurrent_requests_share_steps_and_answer_as_alone(server, client, oracle, pictures):
    questions = [f"Question number {index}?" for index in range(6)]
    contents = [
        [image_part(pictures[index % 3]), {"type": "text", "text": q}] for index, q in enumerate(questions)
    ]
    engine = server.pool.models["tiny"].engine
    steps_before = engine.stats.steps
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda content: ask(client, content).choices[0].message.content, contents))
    alone = [
        oracle.generate([f"<image>\n{q}"], [[pictures[index % 3]]], max_new_tokens=MAX_TOKENS)[0]
        for index, q in enumerate(questions)
    ]
    assert answers == alone
    assert engine.stats.max_rows > 1  # rows were decoded together
    assert engine.stats.steps - steps_before < 6 * MAX_TOKENS


def test_several_models_in_one_process(client, pictures):
    assert sorted(model.id for model in client.models.list()) == ["tiny", "tiny-b"]
    content = [image_part(pictures[0]), {"type": "text", "text": "What colour?"}]
    assert (
        ask(client, content, model="tiny-b").choices[0].message.content
        == ask(client, content).choices[0].message.content
    )


def test_repeated_images_are_encoded_once(server, client, pictures):
    cache = server.pool.feature_cache
    fresh = png_bytes((52, 36), "purple")
    before = (cache.stats.hits, cache.stats.misses)
    history = [{"role": "user", "content": [image_part(fresh), {"type": "text", "text": "What is it?"}]}]
    for turn in range(3):
        answer = client.chat.completions.create(model="tiny", messages=history, max_tokens=4, temperature=0)
        history += [{"role": "assistant", "content": answer.choices[0].message.content or "ok"}]
        history += [{"role": "user", "content": f"Question {turn}?"}]
    assert cache.stats.misses - before[1] == 1  # the vision tower ran for the first turn only
    assert cache.stats.hits - before[0] == 2


# ---------------------------------------------------------------------------------------------- bad requests


def status_and_error(server, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
    )
    return response.status_code, response.json()["error"]


def bomb_png() -> bytes:
    """A small PNG whose header claims 5000×5000 pixels (over the test server's 1 MP cap)."""
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


def user(content) -> dict:
    return {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "no messages": ({"model": "tiny", "messages": []}, 400, "messages"),
    "unknown model": ({**user("hi"), "model": "gpt-9"}, 404, "model"),
    "unknown part type": (user([{"type": "input_audio", "input_audio": {}}]), 400, "messages[0].content[0]"),
    "text part without text": (user([{"type": "text"}]), 400, "messages[0].content[0].text"),
    "unknown role": (
        {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    "image placeholder in text": (user("<image>\nWhat is it?"), 400, "messages[0].content"),
    "ends with the assistant": (
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        400,
        "messages",
    ),
    "too many images": (
        user([image_part(png_bytes((20, 20), "red"))] * 4 + [{"type": "text", "text": "x"}]),
        400,
        "messages",
    ),
    "broken base64": (
        user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
        400,
        "messages[0].content[0].image_url",
    ),
    "not an image": (
        user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]),
        400,
        "messages[0].content[0].image_url",
    ),
    "decompression bomb": (user([image_part(bomb_png())]), 400, "messages[0].content[0].image_url"),
    "private address": (
        user([{"type": "image_url", "image_url": {"url": "http://10.1.2.3/a.png"}}]),
        400,
        "messages[0].content[0].image_url",
    ),
    "local file without permission": (
        user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]),
        400,
        "messages[0].content[0].image_url",
    ),
    "prompt longer than the context": ({**user("hi"), "max_tokens": 10**6}, 400, "messages"),
    "temperature out of range": ({**user("hi"), "temperature": 5}, 400, "temperature"),
    "n above the limit": ({**user("hi"), "n": 100}, 400, "n"),
    "unsupported tools": ({**user("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
    "too many stop strings": ({**user("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "body over the cap": (json.dumps(user("x" * (3 * 1024**2))).encode(), 413, None),
    "JSON nested too deeply": (b"[" * 100_000 + b"]" * 100_000, 400, None),
    "stream_options without stream": (
        {**user("hi"), "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    "stop string too long": ({**user("hi"), "stop": "x" * 1000}, 400, "stop"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_lives(server, client, case):
    body, status, param = BAD_REQUESTS[case]
    got_status, error = status_and_error(server, body)
    assert got_status == status, error
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert ask(client, "Still there?", max_tokens=2).choices[0].message.content is not None


def test_context_length_error_has_openai_code(server):
    _, error = status_and_error(server, {**user("hi"), "max_tokens": 10**6})
    assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]


def test_openai_client_raises_the_matching_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "hi", model="missing")
    with pytest.raises(openai.BadRequestError, match="reserved for images"):
        ask(client, "<image> hi")


def test_api_key_is_required_when_set(checkpoint):
    from llavakit.serving.config import ModelSpec, ServeConfig
    from llavakit.serving.server import BackgroundServer

    config = ServeConfig(models=(ModelSpec("tiny", str(checkpoint)),), port=0, api_key="s3cret")
    with BackgroundServer(config) as running:
        assert httpx.get(f"http://127.0.0.1:{running.port}/health").status_code == 200
        wrong = openai.OpenAI(base_url=running.base_url, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            wrong.models.list()
        assert httpx.get(f"{running.base_url}/models").status_code == 401
        right = openai.OpenAI(base_url=running.base_url, api_key="s3cret", max_retries=0)
        assert [model.id for model in right.models.list()] == ["tiny"]


def test_extreme_sampling_settings_fail_nobody(client, oracle, pictures):
    """A near-zero temperature (inf logits unless shifted) and a seed beyond 64 bits, next to a greedy request."""
    content = [image_part(pictures[0]), {"type": "text", "text": "What colour is the circle?"}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        greedy = pool.submit(ask, client, content, max_tokens=24)
        tiny = pool.submit(ask, client, content, temperature=1e-40, seed=7, max_tokens=8)
        huge_seed = pool.submit(ask, client, content, temperature=1.0, seed=2**64 + 5, n=2, max_tokens=8)
        answers = [greedy.result(), tiny.result(), huge_seed.result()]
    expected = oracle.generate(["<image>\nWhat colour is the circle?"], [[pictures[0]]], max_new_tokens=24)[0]
    assert answers[0].choices[0].message.content == expected
    assert expected.startswith(
        answers[1].choices[0].message.content
    )  # near-zero temperature samples the argmax
    assert len(answers[2].choices) == 2


def test_a_client_that_leaves_frees_its_batch_slot(server):
    engine = server.pool.models["tiny"].engine
    body = {**user("Tell me everything."), "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=0.5)
    steps = engine.stats.steps
    deadline = time.monotonic() + 1.5  # the answer would take several seconds more
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0
    assert engine.stats.steps - steps < 2000
