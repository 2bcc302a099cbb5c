"""The frame workers (server/core.py `Workers`): the hop from the event loop to a worker thread and back that every
analyze request takes. Results and exceptions reach the request that waits for them, a request cancelled while
its job waits never runs it, and the threads are all there from the start (RELIABILITY 13.4)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from appliance.errors import BadRequest
from appliance.server.core import Workers


def worker_threads(name: str) -> list[str]:
    return sorted(thread.name for thread in threading.enumerate() if thread.name.startswith(f"{name}_"))


def test_each_request_gets_its_own_jobs_result_from_a_worker_thread():
    workers = Workers(2, "hop-results")
    try:
        async def main() -> list[tuple[int, str]]:
            def job(number: int) -> tuple[int, str]:
                return number * number, threading.current_thread().name
            return await asyncio.gather(*(workers.run(lambda n=n: job(n)) for n in range(50)))

        answers = asyncio.run(main())
    finally:
        workers.shutdown()
    assert [square for square, _ in answers] == [n * n for n in range(50)]
    assert {thread for _, thread in answers} <= {"hop-results_0", "hop-results_1"}


def test_an_error_raised_in_the_worker_reaches_the_request_as_it_was_raised():
    workers = Workers(1, "hop-errors")

    def bad_frame() -> None:
        raise BadRequest("body has 6220799 bytes; width 1920 x height 1080 x 3 channels needs 6220800")

    try:
        with pytest.raises(BadRequest, match="^body has 6220799 bytes; width 1920 x height 1080 x 3 channels "
                                             "needs 6220800$"):
            asyncio.run(workers.run(bad_frame))
        assert asyncio.run(workers.run(lambda: "next")) == "next"  # the worker carries on
    finally:
        workers.shutdown()


def test_a_request_cancelled_while_its_job_waits_never_runs_it():
    workers = Workers(1, "hop-cancel")
    release = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        first = asyncio.create_task(workers.run(lambda: release.wait(10) and ran.append("first")))
        waiting = asyncio.create_task(workers.run(lambda: ran.append("cancelled")))
        await asyncio.sleep(0.05)
        waiting.cancel()  # as the drain cancels a request that outlasts it (RELIABILITY 10.5)
        release.set()
        await first
        await workers.run(lambda: ran.append("after"))
        with pytest.raises(asyncio.CancelledError):
            await waiting

    try:
        asyncio.run(main())
    finally:
        workers.shutdown()
    assert ran == ["first", "after"]


def test_the_threads_are_started_at_once_and_end_after_shutdown():
    workers = Workers(3, "hop-threads")
    assert worker_threads("hop-threads") == ["hop-threads_0", "hop-threads_1", "hop-threads_2"]
    asyncio.run(workers.run(lambda: None))
    assert len(worker_threads("hop-threads")) == 3  # no thread is added per job
    workers.shutdown()
    for thread in threading.enumerate():
        if thread.name.startswith("hop-threads_"):
            thread.join(5)
    assert worker_threads("hop-threads") == []
