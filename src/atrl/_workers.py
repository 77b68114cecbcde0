"""Worker processes that do not outlive the process that started them."""

from __future__ import annotations

import os
import signal
import threading
import time


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Call in a worker process (a pool's initializer): the worker exits once the process that started it is gone,
    and not before (it ignores stop signals, which are the parent's to act on).

    A training run killed with SIGTERM (a cluster's time limit, `kill`) or SIGKILL (the out-of-memory killer)
    runs no clean-up, and its spawned workers, waiting on their queue, would live on as orphans. A daemon thread
    notices the parent's end by the worker being re-parented, and ends the worker."""
    parent = os.getppid()
    # A cluster's stop signal (or Ctrl-C) reaches the whole process group. The parent saves a checkpoint on
    # SIGTERM / SIGUSR1 after the step in progress, which may still need its workers; they end with the parent.
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="atrl-exit-with-parent", daemon=True).start()
