"""Who may use the console: this machine only unless `console.remote`; the project's key once, then a session
cookie, wherever a browser on another machine could reach it; CSRF protection on every call that changes state.

The rules (docs/console.md, "Security"):

* A browser on another machine is refused (403) unless `console.remote: true`; then it logs in with one of the
  project's keys.
* A browser on this machine logs in too when project.yaml's `host` is not a loopback address: the project is
  meant to be reached from the network, and a proxy on this machine would make every peer look local. Otherwise
  it gets a session at once, and only for a Host header that names this machine (127.0.0.1, localhost, ::1),
  so a page of another site cannot reach it through a DNS name re-pointed at 127.0.0.1 (DNS rebinding).
* The session is an HttpOnly, SameSite=Strict cookie scoped to /console/; it ends after `session_hours` unused.
* Every POST carries the session's CSRF token in the X-Console-CSRF header, and its Origin, when the browser
  sends one, must be this server's own.
* The key is compared in constant time and never logged or sent back; logs name a session by a short id that is
  not its cookie.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from aiohttp import web

from appliance.config.project import ConsoleSettings
from appliance.errors import ApplianceError, Forbidden, Unauthorized
from appliance.server.auth import key_name
from appliance.server.core import peer_is_loopback

log = logging.getLogger("appliance.console")

CSRF_HEADER = "X-Console-CSRF"
# Sessions kept at once: a console has a few users; the least recently used goes first past this.
MAX_SESSIONS = 64
# Wrong keys from one address within WRONG_KEY_WINDOW_S before its login is refused for the rest of the window.
MAX_WRONG_KEYS = 5
WRONG_KEY_WINDOW_S = 60.0
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass
class Session:
    id: str  # in logs: not the cookie
    token: str  # the cookie
    csrf: str
    key_name: str | None  # the project key it logged in with, None on this machine without login
    peer: str
    created: float
    seen: float


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def host_names_this_machine(request: web.Request) -> bool:
    """Whether the Host header is a loopback name or address (any port)."""
    host = request.host
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.lower() in _LOOPBACK_NAMES or is_loopback_host(name)


class Guard:
    """The console's sessions and the checks every console request passes."""

    def __init__(self, settings: ConsoleSettings, project_name: str, listens_beyond_loopback: bool,
                 keys: dict[str, bytes]):
        self.settings = settings
        self.cookie = f"appliance_console_{project_name}"
        self.listens_beyond_loopback = listens_beyond_loopback
        self.keys = keys
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._wrong_keys: dict[str, deque[float]] = {}

    def login_needed(self, request: web.Request) -> bool:
        return self.listens_beyond_loopback or not peer_is_loopback(request)

    def _peer(self, request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[0]) if peer else "unknown"

    def admit_peer(self, request: web.Request) -> None:
        """Refuse other machines unless `console.remote`, and a foreign Host where no login is asked."""
        if not peer_is_loopback(request) and not self.settings.remote:
            raise Forbidden("the console is served to this machine only; set console.remote: true in "
                            "project.yaml to open it from other machines (with the project's key)")
        if not self.login_needed(request) and not host_names_this_machine(request):
            raise Forbidden(f"the console answers this machine's own names only (Host {request.host[:100]!r}); "
                            "open it as http://127.0.0.1:PORT/console/")

    def _expire(self) -> None:
        idle = self.settings.session_hours * 3600
        now = time.monotonic()
        for token, session in list(self._sessions.items()):
            if now - session.seen > idle:
                del self._sessions[token]

    def session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(self.cookie)
        if not token:
            return None
        self._expire()
        session = self._sessions.get(token)
        if session is None:
            return None
        session.seen = time.monotonic()
        self._sessions.move_to_end(token)
        return session

    def _open(self, request: web.Request, key: str | None) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_hex(4), secrets.token_urlsafe(32), secrets.token_urlsafe(24), key,
                          self._peer(request), now, now)
        self._sessions[session.token] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(self.cookie, session.token, path="/console/", httponly=True, samesite="Strict",
                            max_age=int(self.settings.session_hours * 3600))

    def require(self, request: web.Request, *, changes_state: bool) -> Session:
        """The request's session, after every check; raises the refusal the page shows."""
        self.admit_peer(request)
        session = self.session(request)
        if session is None:
            if self.login_needed(request):
                raise Unauthorized("log in to the console with the project's key")
            raise Unauthorized("no console session; reload the page")
        if changes_state:
            self.check_origin(request)
            token = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(token.encode(), session.csrf.encode()):
                raise Forbidden(f"missing or wrong CSRF token ({CSRF_HEADER}); reload the page")
        return session

    def page_session(self, request: web.Request) -> tuple[Session | None, bool]:
        """For the page and GET /console/api/session: the session, one opened now on this machine without
        login, or None when the key is needed. Returns (session, opened now)."""
        self.admit_peer(request)
        session = self.session(request)
        if session is not None:
            return session, False
        if self.login_needed(request):
            return None, False
        session = self._open(request, None)
        log.info("console session %s opened on this machine (%s)", session.id, session.peer)
        return session, True

    def check_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise Forbidden(f"request from another site ({origin[:100]}) refused")

    def login(self, request: web.Request, presented: str) -> Session:
        """A new session for the project's key; wrong keys are counted per address and refused for a while."""
        self.admit_peer(request)
        self.check_origin(request)
        peer = self._peer(request)
        now = time.monotonic()
        if len(self._wrong_keys) > 1024:  # many addresses: forget those with no recent failure
            self._wrong_keys = {address: times for address, times in self._wrong_keys.items()
                                if times and now - times[-1] <= WRONG_KEY_WINDOW_S}
        failures = self._wrong_keys.setdefault(peer, deque())
        while failures and now - failures[0] > WRONG_KEY_WINDOW_S:
            failures.popleft()
        if len(failures) >= MAX_WRONG_KEYS:
            wait = max(1, round(WRONG_KEY_WINDOW_S - (now - failures[0])))
            raise ApplianceError(f"too many wrong keys from {peer}; try again in {wait} s", status=429,
                                 headers={"Retry-After": str(wait)})
        if not self.keys:
            raise Forbidden("this project has no api_key: set one in project.yaml to log in to the console")
        name = key_name(presented.encode("utf-8", "surrogateescape"), self.keys)
        if name is None:
            failures.append(now)
            log.warning("console login refused from %s: wrong key", peer)
            raise Unauthorized("wrong key")
        self._wrong_keys.pop(peer, None)
        session = self._open(request, name)
        log.info("console session %s logged in from %s with key '%s'", session.id, peer, name)
        return session

    def logout(self, session: Session) -> None:
        self._sessions.pop(session.token, None)
        log.info("console session %s logged out", session.id)
