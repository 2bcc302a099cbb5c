"""The console's own thread for disk work (gallery frames, collected teaching frames): a bounded queue, run at a
lower scheduling priority than the inspection workers, so that the line keeps its cores when both want them."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("appliance.console")

# Nice value of the console's threads. On Linux a thread is its own task, so this lowers that thread only:
# the workers keep the process's priority and win the cores whenever both are runnable.
CONSOLE_NICE = 10


def lower_this_thread() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CONSOLE_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the thread runs at the process's priority
        pass


class Background:
    """One thread that runs queued jobs in order; a job offered while the queue is full is dropped and counted
    (the line never waits for the console)."""

    def __init__(self, name: str, capacity: int = 32):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(capacity)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, job: Callable[[], None]) -> bool:
        try:
            self._jobs.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            return  # a job is stuck; the daemon thread ends with the process
        self._thread.join(timeout)

    def _run(self) -> None:
        lower_this_thread()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - a failed write must not end the thread
                log.exception("console background job failed")
