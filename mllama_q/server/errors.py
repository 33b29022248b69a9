"""HTTP errors of the server, rendered the way each API family's clients parse them.

One exception type, `APIError(status, message, param=..., code=...)`, is raised anywhere a
request cannot be served; the app turns it into the body the client library expects:

- OpenAI routes (/v1/*): `{"error": {"message", "type", "param", "code"}}` (the error object of
  the OpenAI API reference; the `openai` Python client raises `BadRequestError`,
  `AuthenticationError`, `NotFoundError`, ... from the status and keeps this object as
  `.body`). During an SSE stream the same object is sent as one `data:` event.
- Ollama routes (/api/*): `{"error": "message"}` (ollama/ollama server/routes.go writes
  `gin.H{"error": ...}` with the status; the `ollama` client raises `ResponseError(error,
  status_code)`). During an NDJSON stream it is one `{"error": ...}` line (routes.go
  streamResponse).
"""

from __future__ import annotations

# OpenAI error `type` by status (platform.openai.com/docs/guides/error-codes; llama.cpp's
# server uses the same names, adding "unavailable_error" for 503 while loading).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}


class APIError(Exception):
    """A request that cannot be served: HTTP `status` and a message for the client."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _OPENAI_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict:
        return {"error": self.message}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
