"""Serving lifecycle: answer on the port while the engine loads, then hand over to vLLM's app.

vLLM binds its socket before building the engine but only answers once the
engine is up, so probes would hang for the whole load. We serve a tiny app on a
duplicate of the same listening socket meanwhile (/health 200: alive; /ready and
everything else 503 in the OpenAI envelope), stop it, and let vLLM's app take
over the original socket: no connection is refused in between.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from .errors import openai_error


def loading_app() -> Starlette:
    async def alive(_request):
        return Response(status_code=200)

    async def loading(_request):
        return openai_error(503, "the model is still loading; retry when /ready returns 200", code="not_ready")

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/health", alive), Route("/{path:path}", loading, methods=methods)])


class _QuietServer(uvicorn.Server):
    """No signal handlers of its own: the process-level ones stay in charge."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self):  # uvicorn >= 0.29
        import contextlib

        return contextlib.nullcontext()


async def serve(args) -> None:
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server

    from unipool_serve.model_executor.settings import ServerSettings

    from .http_protocol import guarded_protocol

    settings = ServerSettings.from_env()

    def interrupt(*_):
        raise KeyboardInterrupt("terminated while loading")

    signal.signal(signal.SIGTERM, interrupt)
    listen_address, sock = setup_server(args, reuse_port=False)
    # Engine construction blocks this event loop, so the placeholder gets a thread and a loop of its own.
    placeholder = _QuietServer(uvicorn.Config(loading_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=asyncio.run, args=(placeholder.serve(sockets=[sock.dup()]),),
                              name="unipool-loading", daemon=True)
    thread.start()
    try:
        async with build_async_engine_client(args) as engine_client:
            placeholder.should_exit = True
            await asyncio.to_thread(thread.join)
            # After the drain a connection still open is a stuck one (a client that stopped reading,
            # a response that never completed): uvicorn would otherwise wait for it for ever.
            shutdown_task = await build_and_serve(
                engine_client, listen_address, sock, args,
                http=guarded_protocol(settings.header_timeout, settings.send_timeout),
                timeout_graceful_shutdown=max(1, int(getattr(args, "shutdown_timeout", 0) or 0)))
        await shutdown_task
    finally:
        placeholder.should_exit = True
        sock.close()
