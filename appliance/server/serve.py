"""Run one project: bind first, print PEKAT's launch markers, prepare the nodes, serve until stopped."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time

from aiohttp import web

from appliance.project import Project
from appliance.runtime.store import StoreError
from appliance.server.app import STATE, ServerState, create_app, queue_depth
from appliance.telemetry.systemd import Notifier
from appliance.threads import started_pool

log = logging.getLogger("appliance.serve")

# Exit codes systemd can tell apart (RELIABILITY 11).
EXIT_CONFIG = 78
EXIT_PORT_IN_USE = 75
EXIT_DEVICE_ABSENT = 69
REFUSE_PHASE_S = 1.0


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


async def serve_project(project: Project, host: str, port: int, stop_key: str | None) -> int:
    app = create_app(project, stop_key=stop_key)
    state = app[STATE]
    # The drain (RELIABILITY 10.1): a refusing phase while still listening, then aiohttp's own wait; together
    # never longer than drain_timeout_s (below systemd's TimeoutStopSec).
    drain = project.config.limits.drain_timeout_s
    refuse_phase = min(REFUSE_PHASE_S, drain / 2)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=drain - refuse_phase)
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
            log.warning("second stop signal during the drain: exiting now, abandoning %d requests", state.in_flight)
            sys.stderr.flush()
            os._exit(1)
        state.stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    notifier = Notifier()
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
    state.metrics.describe_models(project.runtime)
    state.queue_depth = queue_depth(project, state.slots)
    state.ready = True
    _say("STOP_INIT_MODEL")
    notifier.send("READY=1", f"STATUS=serving {project.name} ({len(project.runtime.slots)} models) on {url}")
    watchdog = asyncio.create_task(_watchdog(notifier, state)) if notifier.watchdog_seconds else None
    await state.stop_requested.wait()
    notifier.send("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    state.draining = True
    log.info("stopping: draining %d requests in flight", state.in_flight)
    # Still listening while work is in flight (up to REFUSE_PHASE_S): new requests get 503 `shutting down` and
    # /health/ready 503, so clients and load balancers learn why, rather than meeting a refused connection.
    # Then aiohttp stops listening, closes idle connections and waits for the rest up to drain_timeout_s.
    deadline = loop.time() + refuse_phase
    while (state.in_flight or state.waiting) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await runner.cleanup()
    notifier.close()
    if state.abandoned:
        # The drain timeout passed with requests still running (a hook stuck past it): they are lost, and their
        # worker threads must not hold the exit until they return (RELIABILITY 10.5).
        log.warning("drain timeout of %g s reached: abandoned %d requests", project.config.limits.drain_timeout_s,
                    state.abandoned)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
