"""vLLM's child processes leave their shutdown to the API process (model_executor/lifecycle.py),
checked in a spawned process that vLLM would name "EngineCore", without an engine."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest


def _engine_core(conn) -> None:
    stopped_by = []
    done = threading.Event()

    def vllm_handler(signum, frame):  # stands for vLLM's own (installed before the plugin loads)
        stopped_by.append(signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, vllm_handler)
    signal.signal(signal.SIGINT, vllm_handler)
    from unipool_serve.model_executor import lifecycle

    lifecycle.install()
    conn.send(lifecycle.process_kind())
    while not done.is_set():
        if conn.poll(0.05) and conn.recv() == "still running?":
            conn.send(list(stopped_by))  # signals sent before the question have been handled by now
    conn.send(list(stopped_by))


@pytest.mark.timeout(300)
def test_an_engine_core_ignores_group_signals_and_stops_when_the_api_process_releases_it():
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_engine_core, args=(theirs,), name="EngineCore")
    child.start()
    try:
        assert ours.recv() == "engine"
        for signum in (signal.SIGTERM, signal.SIGINT):  # what a terminal or systemd sends to the group
            os.kill(child.pid, signum)
        ours.send("still running?")
        assert ours.recv() == []  # neither reached vLLM's handler
        os.kill(child.pid, signal.SIGUSR1)  # the API process's release, then its SIGTERM
        os.kill(child.pid, signal.SIGTERM)
        assert ours.recv()[:1] == ["SIGTERM"]  # vLLM's handler ran: the engine core stops
        child.join(120)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


def test_only_vllm_children_are_guarded():
    from unipool_serve.model_executor import lifecycle

    assert lifecycle.process_kind() is None  # this (pytest) process: like the API process
