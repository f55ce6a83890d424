"""Errors the server turns into OpenAI-shaped error bodies: {"error": {message, type, param, code}}."""
from __future__ import annotations

from typing import Any, Optional

from kubetune.errors import KubetuneError


class ServeError(KubetuneError):
    """A problem with a request (or the server's state) answered with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ServeError:
    return ServeError(message, status_code=400, param=param, code=code)


def model_not_found(name: str) -> ServeError:
    # Does not list what is served: adapter names may be private to other clients (GET /v1/models
    # lists them to whoever may call the server).
    return ServeError(
        f"The model `{name[:256]}` does not exist or you do not have access to it.",
        status_code=404,
        param="model",
        code="model_not_found",
    )


def internal_error(request_id: str) -> ServeError:
    """A 500 that tells nothing of the server's internals; the detail is in the server log under request_id."""
    return ServeError(
        f"The server had an error while processing your request (request id {request_id}).",
        status_code=500,
        type="server_error",
        code="internal_error",
    )


class QueueFullError(ServeError):
    def __init__(self, max_queue: int, per_client: Optional[int] = None) -> None:
        if per_client is not None:
            message = f"Too many requests: each client may have at most {per_client} sequences running or waiting. Retry later."
        else:
            message = f"The server is busy: {max_queue} requests are already waiting. Retry later."
        super().__init__(message, status_code=429, type="rate_limit_exceeded", code="rate_limit_exceeded")


class ShuttingDownError(ServeError):
    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down and takes no new requests.",
            status_code=503,
            type="server_error",
            code="shutting_down",
        )
