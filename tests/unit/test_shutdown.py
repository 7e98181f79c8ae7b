"""The API process's draining shutdown, without an engine: it waits for running requests, and a
second SIGINT aborts them (the end-to-end stops are tests/reliability/test_group_stops.py)."""

from __future__ import annotations

import asyncio
import os
import signal

from unipool_serve.server import shutdown as shutdown_module
from unipool_serve.server.shutdown import DrainingShutdown


class FakeEngineClient:
    def __init__(self, running: list[str]):
        self.output_processor = type("OP", (), {"request_states": dict.fromkeys(running)})()
        self.aborted: list[str] = []
        self.stopped_with: list[float | None] = []

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.request_states)

    async def abort(self, request_ids, internal=False):
        self.aborted += list(request_ids)
        for request_id in request_ids:
            self.output_processor.request_states.pop(request_id, None)

    def shutdown(self, timeout=None):
        self.stopped_with.append(timeout)


def test_drains_then_stops_and_a_second_interrupt_aborts_what_runs(monkeypatch):
    exits = []
    monkeypatch.setattr(shutdown_module.os, "_exit", exits.append)

    async def scenario():
        loop = asyncio.get_running_loop()
        engine = FakeEngineClient(["a", "b"])
        drain = DrainingShutdown(engine, loop)
        assert engine.shutdown is drain
        stopping = loop.run_in_executor(None, engine.shutdown, 30)  # as vLLM's signal handler calls it
        while signal.SIGINT not in getattr(loop, "_signal_handlers", {}):  # the drain has armed Ctrl-C
            await asyncio.sleep(0.01)
        assert drain.draining and not stopping.done()  # two requests run: it waits for them
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again
            await stopping
            assert engine.aborted == ["a", "b"] and engine.stopped_with == [30]
            drain.interrupted_again()  # a third time
            assert exits == [130]
            engine.shutdown(5)  # vLLM calls it again on its way out: straight through
            assert engine.stopped_with == [30, 5]
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    asyncio.run(scenario())


def test_with_nothing_running_it_stops_at_once():
    async def scenario():
        engine = FakeEngineClient([])
        DrainingShutdown(engine, asyncio.get_running_loop())
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 30)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        assert engine.stopped_with == [30] and engine.aborted == []

    asyncio.run(scenario())
