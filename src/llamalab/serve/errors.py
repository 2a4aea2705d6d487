"""Errors in OpenAI's shape.

Every answer that is not a success carries `{"error": {"message", "type", "param", "code"}}` (the shape the
`openai` client parses into `openai.BadRequestError` and friends), whatever went wrong: a bad field, a wrong
key, a full queue, or a bug of ours. `APIError` is raised anywhere in the request path; the app turns it,
and anything else, into that JSON with the right status.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

CLIENT_CLOSED = 499  # the client went away before its answer (nginx's status for it; never sent)

# status -> OpenAI's error `type`
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to send to the client: HTTP `status`, a one-line `message`, and the field it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)
