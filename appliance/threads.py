"""Thread pools whose threads all start at once, so the process's thread count is fixed after start-up.

concurrent.futures starts threads lazily and, racing its own idle check, may add one whenever a task is
submitted just before the previous one is counted idle; a count that creeps up over hours looks like a leak
(RELIABILITY 13.4).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def started_pool(workers: int, name: str) -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(barrier.wait)
    barrier.wait()
    return pool
