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


def model_not_found(name: str, available: list[str]) -> ServeError:
    return ServeError(
        f"The model `{name}` does not exist. Served models: {', '.join(available)}.",
        status_code=404,
        param="model",
        code="model_not_found",
    )


class QueueFullError(ServeError):
    def __init__(self, max_queue: int) -> None:
        super().__init__(
            f"The server is busy: {max_queue} requests are already waiting. Retry later.",
            status_code=429,
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
        )


class ShuttingDownError(ServeError):
    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down and takes no new requests.",
            status_code=503,
            type="server_error",
            code="shutting_down",
        )
