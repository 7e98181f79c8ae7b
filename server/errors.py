"""The one way errors leave this server: OpenAI's envelope with the right HTTP status."""

from __future__ import annotations

import json

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
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
                            code: str | None = None, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """The same envelope from raw ASGI middleware (before any route runs)."""
    payload = json.dumps(error_body(status, message, param=param, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def as_envelope(status: int, body: bytes) -> bytes | None:
    """An error response body rewritten into the envelope, or None when it already is one.

    Starlette's own 404/405, FastAPI's `{"detail": ...}` and plain-text errors come out of
    routes this server does not own; clients get the one shape whatever produced the error.
    """
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) and "message" in parsed["error"]:
        return None
    if isinstance(parsed, dict) and "detail" in parsed:
        detail = parsed["detail"]
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', e)}"
                               if isinstance(e, dict) else str(e) for e in detail)
        message = str(detail)
    elif isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"]
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return json.dumps(error_body(status, message[:2000])).encode()


def envelope_errors(send):
    """Wrap an ASGI `send` so that every error response (status >= 400) leaves in the envelope."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        rewritten = as_envelope(start["status"], body)
        headers = start.get("headers", [])
        if rewritten is not None:
            body = rewritten
            headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


class APIError(Exception):
    """Raised anywhere in request handling; turned into the envelope by the handler or middleware."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
