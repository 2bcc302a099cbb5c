"""Run one project: bind first, print PEKAT's launch markers, prepare the nodes, serve until stopped (SIGTERM,
SIGINT); SIGHUP reloads the project's flows and Code hooks (server/reload.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time
from typing import NoReturn

from aiohttp import web

from appliance.project import Project
from appliance.runtime.store import StoreError
from appliance.server.app import create_app
from appliance.server.core import STATE, ServerState, mark_ready
from appliance.server.reload import RELOADS, request_reload, start_pending
from appliance.telemetry.systemd import Notifier
from appliance.threads import started_pool

log = logging.getLogger("appliance.serve")

# Exit codes systemd can tell apart (RELIABILITY 11).
EXIT_CONFIG = 78
EXIT_PORT_IN_USE = 75
EXIT_DEVICE_ABSENT = 69
# How long the drain keeps listening, so that new requests learn why they are refused (503 `shutting down`).
REFUSE_PHASE_S = 1.0
# After the drain, how long aiohttp may take to finish writing answers already made (aiohttp waits up to twice
# this): the whole stop stays within drain_timeout_s + 1 s, below systemd's TimeoutStopSec (RELIABILITY 10.2).
CLOSE_GRACE_S = 0.5


def _say(line: str) -> None:
    # The PEKAT client reads these markers from our stdout, line by line (PROTOCOL.md 6).
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _extend_start_timeout(notifier: Notifier) -> None:
    """A first compile on an iGPU or NPU can outlast TimeoutStartSec: ask for 20 s more every 10 s (11.8)."""
    while notifier.enabled:
        notifier.send("EXTEND_TIMEOUT_USEC=20000000")
        await asyncio.sleep(10)


async def _watchdog(notifier: Notifier, state: ServerState) -> None:
    """Ping from the event loop, and only while the workers make progress (RELIABILITY 13.5, 7.3)."""
    assert notifier.watchdog_seconds is not None
    interval = notifier.watchdog_seconds / 2
    while True:
        idle = state.in_flight == 0
        progressing = time.monotonic() - state.last_progress < notifier.watchdog_seconds
        healthy = state.project.stuck_hooks < state.project.config.limits.max_stuck_hooks
        if (idle or progressing) and healthy:
            notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


def _exit_now(code: int) -> NoReturn:
    """Exit without joining the worker threads: one still inside a hook would hold interpreter exit until the
    hook returns, perhaps never (RELIABILITY 10.4, 10.5). The log is flushed and closed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _drain(state: ServerState, site: web.BaseSite, seconds: float) -> int:
    """RELIABILITY 10.1 (2)-(4), with `state.draining` already set: keep listening for a moment so that new
    requests learn why they are refused, stop listening, then wait for every request being handled, `seconds` in
    all. Open connections stay open meanwhile: an upload in progress is read to its end, and a request on a
    keep-alive connection gets 503 `shutting down` with `Connection: close` (8.4). aiohttp's own shutdown would
    close them at once and drop the rest of an upload. Returns how many requests the deadline abandoned (10.5)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    listen_until = loop.time() + min(REFUSE_PHASE_S, seconds / 2)
    while state.handlers and loop.time() < listen_until:
        await asyncio.sleep(0.02)
    await site.stop()
    while state.handlers and loop.time() < deadline:
        await asyncio.sleep(0.02)
    abandoned = list(state.handlers)
    for task in abandoned:
        # Its client sees the connection close; a worker thread inside a hook may stay busy (_exit_now).
        task.cancel()
    if abandoned:
        await asyncio.wait(abandoned, timeout=1)
    return len(abandoned)


async def serve_project(project: Project, host: str, port: int, stop_key: str | None) -> int:
    app = create_app(project, stop_key=stop_key)
    state = app[STATE]
    notifier = Notifier()
    reloads = app[RELOADS]
    # `systemctl reload` (ExecReload=/bin/kill -HUP $MAINPID): the flows and Code hooks, swapped beside (reload.py).
    # Handled from before __SERVER_RUNNING__: SIGHUP's default action would end the process.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, request_reload, state, reloads, notifier)
    drain_timeout = project.config.limits.drain_timeout_s
    # The drain is ours (_drain); aiohttp's shutdown_timeout (60 s by default, 10.2) only bounds the writing of
    # answers that were ready when it ended.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=CLOSE_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        if error.errno == errno.EADDRINUSE:
            # The PEKAT client matches this exact text (errno 48 is macOS's; Linux says 98).
            _say("OSError: [Errno 48] Address already in use")
            print(f"port {port} on {host} is already in use (another project or PEKAT instance?)",
                  file=sys.stderr, flush=True)
            return EXIT_PORT_IN_USE
        raise
    _say("__SERVER_RUNNING__")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    print(f"appliance: serving project {project.name} on {url}", file=sys.stderr, flush=True)
    log.info("serving project %s on %s", project.name, url)
    loop = asyncio.get_running_loop()
    # Model compiles and pointer checks: a fixed pool instead of asyncio's lazily growing default one.
    loop.set_default_executor(started_pool(2, "runtime"))
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            # An operator who asks twice wants the process gone now (RELIABILITY 10.4).
            log.warning("second stop signal during the drain: exiting now, abandoning %d requests",
                        len(state.handlers))
            _exit_now(1)
        state.stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    extender = asyncio.create_task(_extend_start_timeout(notifier))
    try:
        await loop.run_in_executor(None, project.prepare)
    except StoreError as error:
        # A missing, corrupt or uncompilable model is a configuration problem: no restart loop (RELIABILITY 11.2).
        print(str(error), file=sys.stderr, flush=True)
        log.error("not serving: %s", error)
        await runner.cleanup()
        return EXIT_CONFIG
    except Exception:
        log.exception("preparing the flow's nodes failed")
        await runner.cleanup()
        return 1
    finally:
        extender.cancel()
    mark_ready(state)
    _say("STOP_INIT_MODEL")
    notifier.send("READY=1", f"STATUS=serving {project.name} ({len(project.runtime.slots)} models) on {url}")
    watchdog = asyncio.create_task(_watchdog(notifier, state)) if notifier.watchdog_seconds else None
    start_pending(state, reloads, notifier)
    await state.stop_requested.wait()
    notifier.send("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    state.draining = True  # /health/ready and new analyze requests: 503 `shutting down`
    log.info("stopping: draining %d requests", len(state.handlers))
    abandoned = await _drain(state, site, drain_timeout)
    if abandoned:
        log.warning("drain timeout of %g s reached: abandoned %d requests", drain_timeout, abandoned)
    await runner.cleanup()
    notifier.close()
    # A stuck hook thread would hold interpreter exit; the caller checks only the project it started with, and a
    # reload may have added the hooks.
    if abandoned or (state.project is not project and state.project.stuck_hooks):
        _exit_now(0)  # a clean stop all the same: systemd must not restart a service it asked to stop
    return 0
