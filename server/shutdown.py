"""The API process's shutdown: drain, then stop the engine; Ctrl-C again to stop sooner.

vLLM's SIGTERM/SIGINT handler calls `engine_client.shutdown(timeout)` in a thread once, for
the first of either signal. `DrainingShutdown` wraps that call: it turns the server to
draining (/ready 503, new requests 503 with Retry-After; the endpoint plugin reads
`draining`), stops our background tasks, waits up to the grace period for the running
requests to finish, and stops AsyncLLM's output handler before the engine goes away (a
clean shutdown then logs no EngineDeadError). Then vLLM's own shutdown runs. While it
drains, a second SIGINT (Ctrl-C twice) aborts the running requests, and a third exits at
once. The engine core and the workers leave all of this to this process, even when a
signal reached the whole process group (model_executor/lifecycle.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger("unipool_serve.server")
POLL_S = 0.05


class DrainingShutdown:
    """Replaces `engine_client.shutdown` (see the module doc)."""

    def __init__(self, engine_client, loop, *tasks):
        self.engine_client, self.loop, self.tasks = engine_client, loop, tasks
        self.shutdown = engine_client.shutdown  # vLLM's own
        self.draining = False
        self.stop_now = threading.Event()
        engine_client.shutdown = self

    def __call__(self, timeout: float | None = None, *args, **kwargs):
        if self.draining:  # vLLM calls shutdown again on its way out: nothing left to drain
            return self.shutdown(timeout, *args, **kwargs)
        self.draining = True
        for task in self.tasks:
            self.loop.call_soon_threadsafe(task.cancel)
        # vLLM's handler takes the first SIGINT or SIGTERM and ignores every later one
        self.loop.call_soon_threadsafe(self.loop.add_signal_handler, signal.SIGINT, self.interrupted_again)
        logger.info("unipool_api: draining: new requests get 503, running ones finish (Ctrl-C again: abort them)")
        self.wait_for_running(time.monotonic() + (timeout or 0))
        handler = getattr(self.engine_client, "output_handler", None)
        if handler is not None and not self.engine_client.get_num_unfinished_requests():
            from vllm.utils.async_utils import cancel_task_threadsafe

            cancel_task_threadsafe(handler)  # idle now; the engine's exit would make it log an error
        return self.shutdown(timeout, *args, **kwargs)

    def wait_for_running(self, deadline: float) -> None:
        while self.engine_client.get_num_unfinished_requests() and time.monotonic() < deadline \
                and not self.stop_now.is_set():
            time.sleep(POLL_S)

    def interrupted_again(self) -> None:
        """On the event loop, at a SIGINT while draining: abort what runs; a third time, exit."""
        if self.stop_now.is_set():
            logger.warning("unipool_api: interrupted a third time: exiting at once")
            os._exit(130)
        self.stop_now.set()
        running = list(self.engine_client.output_processor.request_states)
        logger.warning("unipool_api: interrupted again: aborting %d running request(s)", len(running))
        self.loop.create_task(self.engine_client.abort(running, internal=True))
