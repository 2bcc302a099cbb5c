"""Deepomatic's tasks: an inference answers a task id at once and runs in the background; clients poll
`GET /v0.7/tasks/{id}/`. Tasks are kept in memory, the newest `max_tasks` of the last `task_ttl_s` seconds."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pending", "success", "error"]  # the only three the client understands (APIS.md 1.5)


@dataclass
class Task:
    id: str
    created: float = field(default_factory=time.monotonic)
    status: Status = "pending"
    error: str | None = None
    data: dict[str, Any] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "error": self.error, "data": self.data}

    def succeed(self, data: dict[str, Any]) -> None:
        self.status, self.data = "success", data
        self.finished.set()

    def fail(self, message: str) -> None:
        self.status, self.error, self.data = "error", message, None
        self.finished.set()


class Tasks:
    def __init__(self, max_tasks: int, ttl_s: float):
        self.max_tasks = max_tasks
        self.ttl_s = ttl_s
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        # Ids keep growing across restarts (microseconds at start + a counter): an old id never names a new task.
        self._base = time.time_ns() // 1000
        self._count = 0

    def new(self) -> Task:
        self._count += 1
        task = Task(str(self._base + self._count))
        self._tasks[task.id] = task
        self.prune()
        return task

    def prune(self) -> None:
        oldest = time.monotonic() - self.ttl_s
        while self._tasks:
            first = next(iter(self._tasks.values()))
            if len(self._tasks) <= self.max_tasks and first.created >= oldest:
                break
            self._tasks.popitem(last=False)

    def get(self, task_id: str) -> Task | None:
        self.prune()
        return self._tasks.get(task_id)

    def newest_first(self) -> list[Task]:
        self.prune()
        return list(reversed(self._tasks.values()))
