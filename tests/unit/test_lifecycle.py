"""vLLM's child processes leave their shutdown to the API process (model_executor/lifecycle.py),
checked in spawned processes that vLLM would name "EngineCore" and "VllmWorker-0", without an engine."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _spawned(target, name: str):
    """(our end of a pipe, the child): `target(its end)` in a spawned process named `name`, killed after."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=target, args=(theirs,), name=name)
    child.start()
    try:
        yield ours, child
    finally:
        if child.is_alive():
            child.kill()


@pytest.mark.timeout(300)
def test_an_engine_core_ignores_group_signals_and_stops_when_the_api_process_releases_it():
    with _spawned(_engine_core, "EngineCore") as (ours, child):
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


def _idle_worker(conn) -> None:
    import zmq

    def vllm_handler(signum, frame):  # stands for vLLM's worker handler: SystemExit on the main thread
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, vllm_handler)
    signal.signal(signal.SIGINT, vllm_handler)
    from unipool_serve.model_executor import lifecycle

    lifecycle.install()
    # The kernel may hand a process-directed signal to any thread that can take it; here the main
    # thread cannot take the release, so it goes to another one, as it can on a busy machine
    signal.pthread_sigmask(signal.SIG_BLOCK, {lifecycle.RELEASE_SIGNAL})
    context = zmq.Context()
    idle = context.socket(zmq.SUB)  # an idle worker's main thread: a zmq poll without a timeout
    idle.connect("inproc://nobody-writes-here")
    poller = zmq.Poller()
    poller.register(idle, zmq.POLLIN)
    conn.send(lifecycle.process_kind())
    poller.poll()
    conn.send("the poll returned without a stop")


@pytest.mark.timeout(300)
def test_an_idle_worker_stops_when_released_whichever_thread_takes_the_signal():
    """The engine core's exit (a failed start) releases its workers, then SIGTERMs them. The idle
    worker's main thread sleeps in a poll that only a signal directed at it interrupts."""
    with _spawned(_idle_worker, "VllmWorker-0") as (ours, child):
        assert ours.recv() == "worker"
        os.kill(child.pid, signal.SIGUSR1)  # the engine core's release, then multiprocessing's terminate()
        os.kill(child.pid, signal.SIGTERM)
        child.join(120)  # a bound for the hang: it stops at once
        assert child.exitcode == 0, child.exitcode
        assert not ours.poll()


def test_only_vllm_children_are_guarded():
    from unipool_serve.model_executor import lifecycle

    assert lifecycle.process_kind() is None  # this (pytest) process: like the API process
