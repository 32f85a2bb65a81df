"""The chat-completions wire format (OpenAI's), as pydantic models: requests in, responses and stream chunks out.

Request fields llavakit does not implement (``tools``, ``logprobs``, ``response_format`` other than text,
non-zero penalties, ``logit_bias``) are refused with a 400 naming the field rather than silently ignored, so a client
never believes it got something it did not. Other unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llavakit.serving.errors import bad_request

# Every row checks its stop strings against its text at every step: long ones would slow the whole batch.
MAX_STOP_CHARS = 256


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str


class VideoPart(BaseModel):
    """A video (vLLM's ``video_url`` part, which OpenAI's API does not define)."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(BaseModel):
    """One message; ``content`` is a string or a list of text / image_url / video_url parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their no-op values (see the module docstring).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    tools: list[Any] | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    def answer_limit(self) -> int | None:
        """``max_completion_tokens`` (the current name) or else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4 or any(not stop or len(stop) > MAX_STOP_CHARS for stop in stops):
            raise bad_request(
                f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters", param="stop"
            )
        return tuple(stops)

    def check_supported(self) -> None:
        """Refuse fields set to values llavakit does not implement."""
        unsupported = {
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logprobs": self.logprobs,
            "tools": bool(self.tools),
            "logit_bias": bool(self.logit_bias),
            "response_format": self.response_format is not None
            and self.response_format.get("type") != "text",
        }
        for name, used in unsupported.items():
            if used:
                raise bad_request(
                    f"{name} is not supported by llavakit's server; remove it from the request", param=name
                )


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field (``messages.0.content``)."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        # Of a union's alternatives, the one that got furthest into the value says what is wrong.
        error = max(err.errors(), key=lambda item: len(_field_path(item["loc"])))
        param = _param(_field_path(error["loc"]))
        raise bad_request(f"invalid request: {param or 'body'}: {error['msg']}", param=param) from None
    request.check_supported()
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    return request


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(location: tuple) -> list[str | int]:
    """A pydantic error location without its union-branch tags (``str``, ``list[...]``; a content part's ``type``
    tag, which repeats the field name that follows it)."""
    path: list[str | int] = []
    for part in location:
        if isinstance(part, str) and (part in _TYPE_TAGS or set("[-") & set(part)):
            continue
        if not path or part != path[-1]:
            path.append(part)
    return path


def _param(path: list[str | int]) -> str | None:
    """``messages[0].content[1]``: the field as the rest of the server names it."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``chat.completion`` object; ``choices`` holds (text, finish_reason) per choice index."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for index, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    request_id: str,
    model: str,
    index: int | None,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: one choice's delta, or (``index`` None) the final usage-only chunk."""
    choices = (
        [] if index is None else [{"index": index, "delta": delta or {}, "finish_reason": finish_reason}]
    )
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def model_list(names: list[str], created: int) -> dict[str, Any]:
    """The ``GET /v1/models`` body."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llavakit"} for name in names
        ],
    }


__all__ = ["ChatCompletionRequest", "Message", "parse_request"]
