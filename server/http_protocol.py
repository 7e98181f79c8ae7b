"""The HTTP connection: uvicorn's httptools protocol, with deadlines and a bound against slow clients.

uvicorn 0.54 bounds nothing while a request arrives or while a response waits for its reader:
a connection that opens and sends nothing, or its headers a byte at a time (slow-loris), is
held for ever; a response the client stops reading waits in `send` for ever (the socket's
buffer full, uvicorn's write buffer at its 64 KiB high-water mark: memory stays bounded, but
the engine keeps generating for a reader that may never come back). This protocol adds:

  header deadline   a request's headers must be complete within `header_timeout` of the
                    connection opening (or of the request's first byte on a kept-alive
                    connection); otherwise the connection is closed
  header size       at most MAX_HEADER_BYTES of request line and headers: 431, then closed
  send deadline     a response write that waits `send_timeout` for the client to read
                    closes the connection; the route sees a disconnect, as when a client
                    goes away (vLLM aborts the request)

The body deadline is the gateway's (server/gateway.py reads every body it checks). Used by
`unipool-serve` (server/launch.py); vLLM's own entry points use uvicorn's protocol as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

logger = logging.getLogger("unipool_serve.server")
MAX_HEADER_BYTES = 64 << 10


class DeadlineFlowControl(FlowControl):
    """uvicorn's write flow control, whose wait for a paused writer ends with the connection."""

    def __init__(self, transport: asyncio.Transport, send_timeout: float):
        super().__init__(transport)
        self.send_timeout = send_timeout

    async def drain(self) -> None:
        try:
            await asyncio.wait_for(self._is_writable_event.wait(), self.send_timeout)
        except asyncio.TimeoutError:
            logger.warning("closing a connection whose client has read nothing for %.0f s", self.send_timeout)
            # abort, not close: close would wait for the unread buffer to drain, i.e. for ever.
            # connection_lost then marks the request disconnected and wakes this writer.
            self._transport.abort()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module doc; `header_timeout` and `send_timeout` are set by `guarded_protocol`."""

    header_timeout: float = 30.0
    send_timeout: float = 60.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = DeadlineFlowControl(transport, self.send_timeout)
        self._header_bytes = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._header_deadline is None:  # a kept-alive connection's next request
            self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    # ---- helpers ------------------------------------------------------------------------
    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            logger.info("closing a connection that sent no complete request headers within %.0f s",
                        self.header_timeout)
            self.transport.close()

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            self._headers_too_large = True
            # stops the parser; uvicorn then answers through send_400_response, below
            raise ValueError(f"request headers larger than {MAX_HEADER_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        if not getattr(self, "_headers_too_large", False):
            return super().send_400_response(msg)
        body = json.dumps(error_body(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()


def guarded_protocol(header_timeout: float, send_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these deadlines."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"header_timeout": header_timeout, "send_timeout": send_timeout})
