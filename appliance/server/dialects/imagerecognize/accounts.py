"""imagerecognize's per-key state: the daily quota (persisted) and the cache of past results (in memory).

Quota: each key may analyse `daily_quota` images a day (or its own `quotas.<key name>`), counted per analysed
request, never for an error, and back to full at local midnight. The counts live in a small JSON file in the
project folder, written atomically (a temporary file, fsync, rename) after each change, one write at a time
and always the newest counts last, off the event loop; a restart keeps them. A request takes its unit when it
is admitted and gives it back if it fails, so two requests racing for the last unit cannot both pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict, deque
from datetime import date, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("appliance.server.imagerecognize")

# Accounts remembered at most when the project has no key and every apikey string is its own account: an
# open appliance must not grow without bound because clients send ever new strings (the oldest is forgotten).
MAX_ACCOUNTS = 10_000


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class QuotaBook:
    """Units used today per account; `allowance(account)` None means unlimited."""

    def __init__(self, path: Path, daily: int | None, per_account: dict[str, int]):
        self.path = path
        self.daily = daily
        self.per_account = per_account
        self.day = date.today().isoformat()
        self.used: OrderedDict[str, int] = OrderedDict()
        self._dirty = False
        self._saver: asyncio.Task | None = None
        self._warned = False
        self._load()

    @property
    def enabled(self) -> bool:
        return self.daily is not None or bool(self.per_account)

    def allowance(self, account: str) -> int | None:
        return self.per_account.get(account, self.daily)

    def _load(self) -> None:
        if not self.enabled:
            return
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warning("imagerecognize quota file %s unreadable (%s); counting from zero", self.path, error)
            return
        if not isinstance(saved, dict) or saved.get("day") != self.day or not isinstance(saved.get("used"), dict):
            return  # another day (or not ours): today starts full
        for account, count in saved["used"].items():
            if isinstance(account, str) and isinstance(count, int) and count > 0:
                self.used[account] = count

    def _roll(self) -> None:
        today = date.today().isoformat()
        if today != self.day:
            self.day = today
            self.used.clear()
            self._changed()

    def remaining(self, account: str) -> int | None:
        allowance = self.allowance(account)
        if allowance is None:
            return None
        self._roll()
        return max(0, allowance - self.used.get(account, 0))

    def take(self, account: str) -> bool:
        """Use one unit; False when none is left today (nothing is used then)."""
        allowance = self.allowance(account)
        if allowance is None:
            return True
        self._roll()
        used = self.used.get(account, 0)
        if used >= allowance:
            return False
        self.used[account] = used + 1
        self.used.move_to_end(account)
        while len(self.used) > MAX_ACCOUNTS:
            self.used.popitem(last=False)
        self._changed()
        return True

    def give_back(self, account: str) -> None:
        if self.allowance(account) is None:
            return
        used = self.used.get(account, 0)
        if used > 0:  # after a midnight roll there may be nothing to give back
            if used == 1:
                del self.used[account]
            else:
                self.used[account] = used - 1
            self._changed()

    def _changed(self) -> None:
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._saver is None or self._saver.done():
            self._saver = loop.create_task(self._save())

    async def _save(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            self._dirty = False
            text = json.dumps({"day": self.day, "used": dict(self.used)}, indent=1, sort_keys=True)
            try:
                await loop.run_in_executor(None, write_atomic, self.path, text)
                self._warned = False
            except OSError as error:
                if not self._warned:  # a read-only folder: count in memory, say so once
                    log.warning("imagerecognize quota file %s not written (%s); counts are kept in memory",
                                self.path, error)
                    self._warned = True

    async def flush(self) -> None:
        if self._saver is not None:
            await self._saver


class ResultCache:
    """The last `size` results of each account, most recent first, for `type=cache`."""

    def __init__(self, size: int):
        self.size = size
        self.results: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()

    def add(self, account: str, kind: str, objects: list[dict[str, Any]]) -> None:
        if self.size == 0:
            return
        entries = self.results.get(account)
        if entries is None:
            entries = self.results[account] = deque(maxlen=self.size)
        self.results.move_to_end(account)
        while len(self.results) > MAX_ACCOUNTS:
            self.results.popitem(last=False)
        entries.appendleft({"type": kind, "objects": objects,
                            "time": datetime.fromtimestamp(time.time()).astimezone().isoformat(timespec="seconds")})

    def of(self, account: str) -> list[dict[str, Any]]:
        return list(self.results.get(account, ()))
