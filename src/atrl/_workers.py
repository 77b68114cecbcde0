"""Worker processes that do not outlive the process that started them, and that a stop signal does not kill."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # a cluster's time limit or preemption (SLURM: --signal=TERM@120),
# `kill`, Ctrl-C: the training process's to act on (`atrl.rl.checkpoints.StopOnSignal`), its workers ignore them


def _stop_signals() -> set[signal.Signals]:
    return {getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)}


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Wrap a process pool's `submit` in this (a pool starts its workers there, one at a time as work comes).

    The calling thread blocks the stop signals, and a worker started meanwhile inherits the blocked mask through
    fork and exec. A cluster's SIGTERM to the process group while a worker starts up (importing torch takes
    seconds) then waits until `exit_with_parent` ignores it, instead of killing the worker and breaking the pool
    (BrokenProcessPool at the next submit). A stop signal that reaches the parent meanwhile is delivered to it
    when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Call in a worker process (a pool's initializer): the worker exits once the process that started it is gone,
    and not before (it ignores stop signals, which are the parent's to act on).

    A training run killed with SIGTERM (a cluster's time limit, `kill`) or SIGKILL (the out-of-memory killer)
    runs no clean-up, and its spawned workers, waiting on their queue, would live on as orphans. A daemon thread
    notices the parent's end by the worker being re-parented, and ends the worker."""
    parent = os.getppid()
    # A cluster's stop signal (or Ctrl-C) reaches the whole process group. The parent saves a checkpoint on
    # SIGTERM / SIGUSR1 after the step in progress, which may still need its workers; they end with the parent.
    for sig in _stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started under `stop_signals_blocked`: what came meanwhile is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _stop_signals())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="atrl-exit-with-parent", daemon=True).start()
