"""Who stops vLLM's processes: the API process alone, whatever got the signal.

vLLM 0.32 serves from three processes: the API process, the engine core it starts, and the
workers the engine core starts. Each installs its own SIGTERM/SIGINT handler, so a signal
sent to the whole process group (systemd's `KillMode=control-group`, `kill -TERM -PGID`, a
terminal's Ctrl-C) stops the worker at once and every running request fails, while the API
process was about to drain them. Installed by the plugin's `register()` in every process:

  engine core  ignores SIGTERM and SIGINT while the API process lives. The API process stops
               it on purpose by sending SIGUSR1 first (`vllm.v1.engine.utils.shutdown` is
               wrapped in the API process), which hands the signals back to vLLM's own handler.
               When the API process dies (SIGKILL, a crash), the engine core stops the same way;
               if it still runs after ORPHAN_GRACE_S, it exits. Both are acted on by a thread of
               ours, not by a Python signal handler: an idle engine core's main thread may not
               run one until its next request (a stop of an idle engine then waited the whole
               grace period and ended in SIGKILL).
  worker       ignores SIGTERM and SIGINT while the engine core lives: the engine core stops it
               through vLLM's death pipe, which also ends it when the engine core is gone. One
               stop does not go through the pipe: an engine core that fails to start (a KV cache
               that does not fit, a bad checkpoint) has no executor left to close it, and ends
               through multiprocessing's exit, which SIGTERMs its children and joins them. So the
               engine core sends RELEASE_SIGNAL to its children first (`multiprocessing.util.
               _exit_function` is wrapped there), and a worker stops on it through vLLM's own
               handler, whatever becomes of the SIGTERM (two signals from one sender can reach
               Python's handlers in either order on a busy machine: a "release, then obey the
               next SIGTERM" protocol lost that race). Without it the server hung on a failed
               start (a SIGTERM to `vllm serve` too) instead of exiting with the error.

In both children the release is acted on by a thread of ours, not by a Python signal handler:
a handler runs on the main thread only, once the kernel has interrupted that thread, and an idle
child's main thread waits in a blocking call (the engine core in `input_queue.get()`, a worker
in the zmq poll of its message queue). A process-directed signal goes to any thread that can
take it; when it went to another one (the main thread already had the SIGTERM pending), the
main thread slept on and the release waited for a message that never came: a failed start
then hung after all, now and then, on a busy machine. The thread sees the signal through the
wakeup fd, which is written by whichever thread takes it.

Both child kinds also end quietly: after vLLM's own shutdown has run, the process unlinks the
shared-memory rings it created (vLLM unlinks them only when they are garbage-collected, and a
process ending in a signal handler may not collect them: the resource tracker then warns of a
leak) and leaves with `os._exit`, skipping interpreter finalisation, where Triton's bindings
would print a report of objects still alive at exit. Everything that matters (vLLM's cleanup,
multiprocessing's, logging) has run by then.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import weakref

logger = logging.getLogger("unipool_serve.lifecycle")

# API process -> engine core: "my SIGTERM follows, obey it"; engine core -> worker: "I am exiting, stop"
RELEASE_SIGNAL = signal.SIGUSR1
ORPHAN_GRACE_S = 10.0
GUARDED = (signal.SIGTERM, signal.SIGINT)
_installed = False
_shm_rings: weakref.WeakSet = weakref.WeakSet()


def process_kind() -> str | None:
    """'engine' or 'worker' in vLLM's child processes (by the names vLLM gives them), else None."""
    name = multiprocessing.current_process().name
    if name.startswith("EngineCore"):
        return "engine"
    if name.startswith("VllmWorker-"):
        return "worker"
    return None


def install() -> None:
    """Called by the plugin's register() in every vLLM process; idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    kind = process_kind()
    if kind is None:
        if multiprocessing.parent_process() is None:  # the API process (or an offline `LLM`'s)
            _release_engine_before_terminating()
        return
    parent = multiprocessing.parent_process()
    if parent is None or threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread of a spawned child
    _ignore_while_parent_lives(kind, parent)
    _track_shm_rings()
    _exit_quietly_after_bootstrap()


# ---- the API process --------------------------------------------------------------------


def _release_engine_before_terminating() -> None:
    """Wrap vLLM's engine-process shutdown so that each engine core gets RELEASE_SIGNAL first."""
    from vllm.v1.engine import utils as engine_utils

    terminate = engine_utils.shutdown
    if getattr(terminate, "unipool_releases", False):
        return

    def shutdown(procs, timeout=None):
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                try:
                    os.kill(proc.pid, RELEASE_SIGNAL)
                except ProcessLookupError:
                    pass
        return terminate(procs, timeout)

    shutdown.unipool_releases = True
    engine_utils.shutdown = shutdown


# ---- vLLM's child processes ---------------------------------------------------------------


def _ignore_while_parent_lives(kind: str, parent) -> None:
    vllm_handlers = {signum: signal.getsignal(signum) for signum in GUARDED}
    released = threading.Event()

    def to_vllm(signum, frame=None):
        handler = vllm_handlers[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def guard(signum, frame):
        if released.is_set() or not parent.is_alive():
            return to_vllm(signum, frame)
        logger.info("%s %s ignored: the API process drains and then stops this process",
                    kind, signal.Signals(signum).name)

    for signum in GUARDED:
        signal.signal(signum, guard)
    if kind == "engine":
        # vLLM's engine-core handler only flags the shutdown and wakes the busy loop through a
        # queue, both safe from any thread; if the API process dies, the engine core stops too
        _act_on_release("engine core", parent, released, lambda: to_vllm(signal.SIGTERM), orphaned_too=True)
        _release_children_before_exiting()
    else:
        # vLLM's worker handler raises SystemExit, which must happen on the main thread: a
        # SIGTERM directed at that thread interrupts its wait, and `guard` hands it to vLLM.
        # The engine core's death is vLLM's own business here (its death pipe).
        main = threading.main_thread().ident
        _act_on_release("worker", parent, released, lambda: signal.pthread_kill(main, signal.SIGTERM),
                        orphaned_too=False)


def _act_on_release(name: str, parent, released: threading.Event, stop, orphaned_too: bool) -> None:
    """Call `stop` from a thread of our own on RELEASE_SIGNAL (see the module doc for why a
    thread) and, if `orphaned_too`, on the parent's death, exiting if `stop` has not ended the
    process ORPHAN_GRACE_S later."""
    signal.signal(RELEASE_SIGNAL, lambda signum, frame: None)  # caught (not fatal); acted on below
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)

    def release(reason: str) -> None:
        if not released.is_set():
            released.set()
            logger.info("%s: %s", name, reason)
            stop()

    def watch():
        while True:
            ready = multiprocessing.connection.wait([parent.sentinel, wakeup_read])
            if wakeup_read in ready and RELEASE_SIGNAL in os.read(wakeup_read, 512):
                release("released by its parent process")
            if parent.sentinel in ready:
                break
        if released.is_set() or not orphaned_too:
            return
        logger.warning("the API process is gone: stopping the %s", name)
        release("its API process is gone")
        threading.Event().wait(ORPHAN_GRACE_S)
        logger.error("the %s did not stop %.0f s after its API process died: exiting", name, ORPHAN_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="unipool-lifecycle", daemon=True).start()


def _release_children_before_exiting() -> None:
    """Wrap multiprocessing's exit (it SIGTERMs this process's children, then joins them) so that the
    children are released first: otherwise a worker the engine core never stopped itself (a failed
    start) ignores that SIGTERM and the join waits forever."""
    from multiprocessing import util

    exit_function = util._exit_function
    if getattr(exit_function, "unipool_releases", False):
        return

    def release_then_exit(*args, **kwargs):
        for child in multiprocessing.active_children():
            if child.pid is not None:
                try:
                    os.kill(child.pid, RELEASE_SIGNAL)
                except ProcessLookupError:
                    pass
        return exit_function(*args, **kwargs)

    release_then_exit.unipool_releases = True
    util._exit_function = release_then_exit


def _track_shm_rings() -> None:
    """Remember the shared-memory rings this process creates, to unlink them at exit."""
    from vllm.distributed.device_communicators import shm_broadcast

    ring = shm_broadcast.ShmRingBuffer
    if getattr(ring.__init__, "unipool_tracked", False):
        return
    init = ring.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if getattr(self, "is_creator", False):
            _shm_rings.add(self)

    tracked_init.unipool_tracked = True
    ring.__init__ = tracked_init


def _unlink_shm_rings() -> None:
    for ring in list(_shm_rings):
        ring.is_creator = False  # its __del__, should it still run, must not unlink it again
        try:
            ring.shared_memory.unlink()
        except OSError:  # FileNotFoundError: already gone
            pass


def _exit_quietly_after_bootstrap() -> None:
    """Replace the spawned child's final `sys.exit(exitcode)` (multiprocessing.spawn.spawn_main)
    by: unlink our rings, flush, os._exit. Any other sys.exit call behaves as before."""
    from multiprocessing import spawn

    exit_ = sys.exit

    def exit_after_bootstrap(code=None):
        caller = sys._getframe(1).f_code
        if caller is not spawn.spawn_main.__code__:
            return exit_(code)
        _unlink_shm_rings()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))

    sys.exit = exit_after_bootstrap
