"""The FastAPI application: ``POST /v1/chat/completions`` (plain and streamed), ``GET /v1/models``, ``GET /health``.

A request goes through four steps, each refusing bad input with an OpenAI-style 4xx before any model work:

1. the body is read with a size cap and parsed (`llavakit.serving.protocol`);
2. messages become a conversation with placeholders (`llavakit.serving.messages`);
3. in a worker thread, images (and videos, ``video_url`` parts, for a model built with video) are fetched and
   decoded under the media policy (`llavakit.serving.media`) and the prompt is tokenised with the checkpoint's
   template (`llavakit.inference.prompts`); its length is checked against the model's context;
4. one `EngineRequest` per choice (``n``) joins the model's continuous batch; its events come back through an
   asyncio queue and become one JSON response or server-sent events (``data: {chunk}`` ... ``data: [DONE]``).

Requests are isolated: everything that can fail because of one request fails in steps 1-3, in its own handler;
the engine retries a failing prefill request by request. A client that disconnects from a stream cancels its rows.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llavakit.errors import LlavakitError
from llavakit.inference.engine import EngineBusy, EngineRequest, Event, Failed, Finished, TextDelta
from llavakit.inference.prompts import EncodedRequest
from llavakit.inference.prompts import Request as PromptRequest
from llavakit.inference.videos import no_video_error
from llavakit.serving.config import ServeConfig
from llavakit.serving.errors import APIError, api_error_handler, bad_request, unexpected_error_handler
from llavakit.serving.media import MediaError, MediaPolicy, load_image_url, load_video_url
from llavakit.serving.messages import ParsedMessages, parse_messages
from llavakit.serving.pool import ModelPool, ServedModel
from llavakit.serving.protocol import (
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    model_list,
    parse_request,
    usage,
)


@dataclass
class _Job:
    """One HTTP request's rows in the engine and the queue their events arrive on (as (choice, event))."""

    served: ServedModel
    rows: list[EngineRequest]
    events: asyncio.Queue

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()


def create_app(pool: ModelPool, config: ServeConfig) -> FastAPI:
    """The server application over loaded models."""
    # No /docs, /redoc or /openapi.json: they would be reachable without the API key.
    app = FastAPI(
        title="llavakit",
        description="OpenAI-compatible chat completions for LLaVA-NeXT models.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    policy = MediaPolicy(
        allowed_local_path=config.allowed_local_media_path,
        allowed_domains=config.allowed_media_domains,
        max_image_bytes=config.max_image_bytes,
        max_image_pixels=config.max_image_pixels,
        fetch_timeout_s=config.fetch_timeout_s,
        max_video_bytes=config.max_video_bytes,
        max_video_frames=config.max_video_frames,
        max_video_source_frames=config.max_video_source_frames,
        max_video_decoded_pixels=config.max_video_decoded_pixels,
        max_video_sampled_pixels=config.max_video_sampled_pixels,
        video_decode_timeout_s=config.video_decode_timeout_s,
    )
    created = int(time.time())
    authorized = Depends(_api_key_check(config.api_key))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[authorized])
    async def models() -> dict[str, Any]:
        return model_list(list(pool.models), created)

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(http_request: Request) -> Any:
        request = parse_request(await _read_json(http_request, config.max_body_bytes))
        served = pool.get(request.model)
        if request.n > config.max_n:
            raise bad_request(f"n={request.n} is above this server's limit of {config.max_n}", param="n")
        stops = request.stop_strings()
        parsed = parse_messages(
            request.messages,
            config.max_images_per_request,
            config.max_videos_per_request,
            video_model=served.assistant.model.config.video_spec is not None,
        )
        encoded = await run_in_threadpool(_encode, served, parsed, policy)
        prompt_tokens = len(encoded.input_ids)
        max_new = _answer_budget(served, request, prompt_tokens, config.default_max_tokens)
        job = _submit(served, request, encoded, max_new, stops)
        del encoded, parsed  # the engine holds the images until prefill, this handler no longer
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            stream = _stream(job, request, completion_id(), prompt_tokens, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=_STREAM_HEADERS)
        body = await _collect(job, request, prompt_tokens, http_request)
        return JSONResponse(body) if body is not None else None

    return app


# Proxies must pass events through as they come rather than buffer the response.
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How often a non-streamed request checks that its client is still connected.
_DISCONNECT_POLL_S = 0.25


def _api_key_check(api_key: str | None):
    async def check(http_request: Request) -> None:
        if api_key is None:
            return
        header = http_request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send the server's key as 'Authorization: Bearer KEY' "
                "(the openai client: api_key=KEY)",
                code="invalid_api_key",
            )

    return check


async def _http_error_handler(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)


async def _read_json(http_request: Request, limit: int) -> Any:
    """The body as JSON, refusing bodies over ``limit`` bytes (413) without reading them whole."""
    declared = http_request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise bad_request(
            f"the body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    except UnicodeDecodeError:
        raise bad_request("the body is not UTF-8 JSON") from None
    except RecursionError:
        raise bad_request("the body's JSON is nested too deeply") from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body ({size} bytes or more) exceeds this server's limit of {limit} bytes: send smaller or "
        "fewer images (the server's --max-body-bytes sets the limit)",
        code="request_too_large",
    )


def _encode(served: ServedModel, parsed: ParsedMessages, policy: MediaPolicy) -> EncodedRequest:
    """Fetch and decode the images and videos, then tokenise the conversation (runs in a worker thread)."""
    video_spec = served.assistant.model.config.video_spec
    if parsed.videos and video_spec is None:
        raise bad_request(
            f"model {served.name!r}: {no_video_error()}", param=parsed.videos[0].param, code="video_not_supported"
        )
    images, videos = [], []
    try:
        for ref in parsed.images:
            images.append(load_image_url(ref.url, policy))
        for ref in parsed.videos:
            videos.append(load_video_url(ref.url, policy, video_spec))
    except MediaError as err:
        raise APIError(err.status, str(err), param=ref.param, code=err.code) from None
    try:
        return served.assistant.prompts.encode(
            PromptRequest(parsed.conversation, tuple(images), tuple(videos))
        )
    except LlavakitError as err:
        raise bad_request(str(err), param="messages") from None


def _answer_budget(
    served: ServedModel, request: ChatCompletionRequest, prompt_tokens: int, default: int
) -> int:
    """Tokens the answer may take: the request's limit, or the server default capped by the context left."""
    left = served.context_length - prompt_tokens
    limit = request.answer_limit()
    if left < 1 or (limit is not None and limit > left):
        wanted = f" and {limit} for the answer" if limit is not None else ""
        raise bad_request(
            f"this model's maximum context length is {served.context_length} tokens, but the request needs "
            f"{prompt_tokens} for the prompt (images included){wanted}: shorten the conversation, send fewer or "
            "smaller images, or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return limit if limit is not None else min(default, left)


def _submit(
    served: ServedModel,
    request: ChatCompletionRequest,
    encoded: EncodedRequest,
    max_new: int,
    stops: tuple[str, ...],
) -> _Job:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    rows = []
    for choice in range(request.n):

        def deliver(event: Event, choice: int = choice) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (choice, event))

        rows.append(
            EngineRequest(
                prompt_ids=encoded.input_ids,
                images=encoded.images,
                videos=encoded.videos,
                max_new_tokens=max_new,
                on_event=deliver,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=None if request.seed is None else request.seed + choice,
                stop=stops,
                stream=request.stream,
            )
        )
    try:
        for row in rows:
            served.engine.submit(row)
    except EngineBusy as err:
        for row in rows:
            row.cancel()
        raise APIError(503, f"the server is busy: {err}", code="server_busy", type="server_error") from None
    return _Job(served, rows, events)


async def _collect(
    job: _Job, request: ChatCompletionRequest, prompt_tokens: int, http_request: Request
) -> dict[str, Any] | None:
    """Wait for every choice and build the ``chat.completion`` body; None when the client went away first (its
    rows are cancelled, so an abandoned request does not hold a batch slot to the end of its answer)."""
    results: dict[int, Finished] = {}
    watcher = asyncio.create_task(_watch_disconnect(job, http_request))
    try:
        while len(results) < len(job.rows):
            choice, event = await job.events.get()
            if choice is None:
                return None
            if isinstance(event, Failed):
                raise _engine_error(event.error)
            if isinstance(event, Finished):
                results[choice] = event
    finally:
        watcher.cancel()
        job.cancel()
    choices = [(results[index].text, results[index].reason) for index in range(len(job.rows))]
    completion = sum(result.completion_tokens for result in results.values())
    return completion_body(completion_id(), request.model, choices, prompt_tokens, completion)


async def _watch_disconnect(job: _Job, http_request: Request) -> None:
    """Cancel ``job`` and wake its collector when the client disconnects."""
    while not await http_request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)
    job.cancel()
    job.events.put_nowait((None, None))


async def _stream(
    job: _Job, request: ChatCompletionRequest, request_id: str, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, text deltas, a finish chunk per choice, usage, ``[DONE]``."""
    finished: dict[int, Finished] = {}
    try:
        for choice in range(len(job.rows)):
            yield _sse(chunk_body(request_id, request.model, choice, {"role": "assistant", "content": ""}))
        while len(finished) < len(job.rows):
            choice, event = await job.events.get()
            if isinstance(event, TextDelta) and event.text:
                yield _sse(chunk_body(request_id, request.model, choice, {"content": event.text}))
            elif isinstance(event, Finished):
                finished[choice] = event
                yield _sse(chunk_body(request_id, request.model, choice, {}, finish_reason=event.reason))
            elif isinstance(event, Failed):
                yield _sse(_engine_error(event.error).body())
                break
        else:
            if include_usage:
                completion = sum(result.completion_tokens for result in finished.values())
                yield _sse(
                    chunk_body(request_id, request.model, None, usage_counts=usage(prompt_tokens, completion))
                )
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _engine_error(error: BaseException) -> APIError:
    if isinstance(error, LlavakitError):
        return bad_request(str(error))
    return APIError(500, f"generation failed ({type(error).__name__}: {error})", type="server_error")
