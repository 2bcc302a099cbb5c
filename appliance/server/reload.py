"""Reload on SIGHUP (`systemctl reload`): project.yaml's flows and the Code hooks, swapped the way models are.

The new project is read, compiled and prepared (hooks imported, new models compiled) beside the serving one, in
a thread of the runtime pool, never on the event loop nor in a frame worker. Then it is put in place with one
assignment (`state.project`), so a request that started on the old flow finishes on it and none fails. A flow
that does not load (a validation error, a missing model, a hook that fails to import) changes nothing: the old
one keeps serving, the problems go to the log at ERROR with their `file:line`, and GET /health shows them under
`reload_failed` until a later reload succeeds. Settings the server fixed at start (port, host, APIs, keys,
device, ...: project.RESTART_SETTINGS) keep their old values; the log and /health (`restart_needed`) say that
they need a restart.

One change to the serving project at a time: a reload, a model switch (POST /models/switch) and the pointer
follower's swap each hold `Reloads.lock`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from appliance.errors import BadRequest, ConfigError
from appliance.project import Project
from appliance.runtime.store import StoreError
from appliance.server.core import STATE, ServerState, queue_depth
from appliance.telemetry.systemd import Notifier

log = logging.getLogger("appliance.reload")

# How long a reload may prepare the new flow (import hooks, compile new models: a first NPU compile takes minutes)
# before it counts as failed; model switches wait for it meanwhile.
RELOAD_TIMEOUT_S = 300.0


@dataclass
class Reloads:
    # Held by reloads, model switches and the pointer follower: one change to the serving project at a time.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The problems of the last reload when it failed (the old flow serves); None after a good one.
    failed: str | None = None
    # project.yaml settings that changed but need a restart to apply (their old values stay in use).
    restart_needed: list[str] = field(default_factory=list)
    done: int = 0
    # A reload was asked for and has not started yet (SIGHUP during a reload, or before the project was ready).
    requested: bool = False
    task: asyncio.Task | None = None


RELOADS = web.AppKey("reloads", Reloads)


async def switch_version(app: web.Application, name: str, version: str) -> str | None:
    """Load ``version`` of model ``name`` beside the running one and swap (POST /models/switch, the console);
    returns the version it replaced. One change at a time (a reload, the pointer follower): the slots switched
    are the serving project's."""
    state = app[STATE]
    async with app[RELOADS].lock:
        runtime = state.project.runtime
        if not any(slot.name == name for slot in runtime.slots.values()):
            known = ", ".join(sorted({slot.name for slot in runtime.slots.values()})) or "none"
            raise BadRequest(f"model '{name}' is not used by this project's flow; models: {known}")
        try:
            # Compiling takes seconds: a thread of its own, never a worker that frames are waiting for. The
            # pointer is written before the swap, under the model's lock: the answer is never undone.
            previous = await asyncio.get_running_loop().run_in_executor(None, runtime.switch, name, version)
        except StoreError as error:
            log.error("model %s: version %s not loaded, the old one keeps serving: %s", name, version, error)
            raise BadRequest(str(error)) from None
        state.metrics.describe_models(runtime)
    return previous


def request_reload(state: ServerState, reloads: Reloads, notifier: Notifier) -> None:
    """SIGHUP: reload now, or right after the reload that is running, or once the project is ready."""
    if state.draining:
        log.info("reload ignored: stopping")
        return
    reloads.requested = True
    if reloads.task is not None and not reloads.task.done():
        log.info("reload requested during a reload: it follows this one")
    elif not state.ready:
        log.info("reload requested while starting: it follows once the project is ready")
    else:
        reloads.task = asyncio.create_task(_reload_while_requested(state, reloads, notifier))


def start_pending(state: ServerState, reloads: Reloads, notifier: Notifier) -> None:
    """After start-up: a reload asked for while the nodes were being prepared runs now."""
    if reloads.requested and (reloads.task is None or reloads.task.done()):
        reloads.task = asyncio.create_task(_reload_while_requested(state, reloads, notifier))


async def _reload_while_requested(state: ServerState, reloads: Reloads, notifier: Notifier) -> None:
    while reloads.requested and not state.draining:
        reloads.requested = False
        await reload_project(state, reloads, notifier)


async def reload_project(state: ServerState, reloads: Reloads, notifier: Notifier) -> bool:
    """Read, compile and prepare the project's files beside the serving project, then swap; True when the new
    flow serves. The serving project is untouched when anything fails."""
    # systemd shows `reloading` until READY=1 (sd_notify(3); MONOTONIC_USEC is required by Type=notify-reload).
    notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        async with reloads.lock:
            old = state.project
            log.info("reload: reading %s", old.files.directory / "project.yaml")
            try:
                new, restart_needed = await asyncio.wait_for(loop.run_in_executor(None, old.reloaded),
                                                             RELOAD_TIMEOUT_S)
            except TimeoutError:
                # A thread cannot be killed; its result, if it ever comes, is dropped. Switches may go on.
                problems = [f"the reload did not finish within {RELOAD_TIMEOUT_S:g} s (a hook whose import never "
                            "returns?); restart the service to load the project's files"]
            except ConfigError as error:
                problems = error.problems
            except StoreError as error:
                problems = [str(error)]
            except Exception:
                log.exception("reload: unexpected failure")
                problems = ["unexpected error while reloading; the appliance log has the traceback"]
            else:
                _install(state, new)
                reloads.failed = None
                reloads.restart_needed = restart_needed
                reloads.done += 1
                if restart_needed:
                    log.warning("reload: project.yaml changes %s, which apply only after a restart (systemctl "
                                "restart appliance@%s); until then the values loaded at start stay in use",
                                ", ".join(restart_needed), new.files.directory.name)
                log.info("reload: flow %s (sha256 %s) serving with %d nodes, prepared in %.2f s",
                         new.files.flow_path.name, new.flow_sha256[:12], new.node_count,
                         time.perf_counter() - started)
                return True
        reloads.failed = "; ".join(problems)
        log.error("reload failed, the flow loaded before keeps serving: %s", reloads.failed)
        return False
    finally:
        notifier.send("READY=1", f"STATUS=serving {state.project.name} ({len(state.project.runtime.slots)} "
                      f"models), {reloads.done} reload(s)" + (", last one failed" if reloads.failed else ""))


def _install(state: ServerState, new: Project) -> None:
    """Put the reloaded project in place: what the server derives from the project first, the project last, with
    no await in between (a request reads `state.project` once and keeps that project to its end)."""
    new.runtime.take_over()
    state.code_nodes = frozenset(node.id for node in new.nodes if node.settings.type == "code@1")
    state.queue_depth = queue_depth(new, state.slots)
    state.project = new
    state.metrics.describe_models(new.runtime)
    state.metrics.describe_project(new.name, new.flow_sha256)
