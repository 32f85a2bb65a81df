"""OpenAI-style errors: every refusal is a JSON body ``{"error": {"message", "type", "param", "code"}}``.

Clients written for OpenAI (its Python client raises ``BadRequestError`` / ``AuthenticationError`` /
``NotFoundError`` from the status and shows ``error.message``) must see the same shapes from llavakit, so request
problems are raised as `APIError` anywhere in the serving code and turned into responses in one place.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses or could not complete.

    Args:
        status: HTTP status (400 bad request, 401 no/wrong key, 404 unknown model, 413 body too large, 503 ...).
        message: what is wrong and how to fix it.
        param: the request field at fault (``messages[0].content[1].image_url``), when one is.
        code: a machine-readable reason (``context_length_exceeded``, ``model_not_found``, ...).
        type: OpenAI's error type (``invalid_request_error`` for client errors).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


async def api_error_handler(_: Request, error: APIError) -> JSONResponse:
    """FastAPI exception handler: `APIError` → its status and body."""
    return JSONResponse(error.body(), status_code=error.status)


async def unexpected_error_handler(_: Request, error: Exception) -> JSONResponse:
    """Anything unforeseen is the server's fault: a 500 in OpenAI's shape, never a dropped connection."""
    body = APIError(
        500, f"internal server error ({type(error).__name__}): {error}", type="server_error"
    ).body()
    return JSONResponse(body, status_code=500)
