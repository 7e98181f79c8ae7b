"""The one way errors leave this server: OpenAI's envelope with the right HTTP status."""

from __future__ import annotations

import json

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code or status}}


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None):
    """A FastAPI/Starlette JSONResponse carrying `{"error": {message, type, param, code}}`."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status)


async def send_openai_error(send, status: int, message: str, *, param: str | None = None,
                            code: str | None = None) -> None:
    """The same envelope from raw ASGI middleware (before any route runs)."""
    payload = json.dumps(error_body(status, message, param=param, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class APIError(Exception):
    """Raised anywhere in request handling; turned into the envelope by the handler or middleware."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
