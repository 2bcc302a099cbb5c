"""Shared by the output tests: a flow whose verdict each request chooses (`data=ng` is NG), one frame, a call, and
a peer that never answers."""

from __future__ import annotations

import socket
import threading
from typing import Any

import cv2
import numpy as np
import requests

VERDICT = "def main(context):\n    context['result'] = context['data'] != 'ng'\n"
# The same with a score, for outputs that carry it (0.5 for OK, 0.125 for NG: exact in binary).
SCORED_VERDICT = VERDICT + "    context['score'] = 0.125 if context['data'] == 'ng' else 0.5\n"
FLOW = {"nodes": {"verdict": {"type": "code@1", "module": "verdict"}}}
FRAME = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()


def analyse(url: str, verdict: str, request_id: str, session: Any = requests) -> requests.Response:
    return session.post(f"{url}/analyze_image?data={verdict}", data=FRAME, headers={"X-Request-Id": request_id},
                        timeout=30)


class SilentPeer:
    """A peer on a loopback port that never answers: a PLC, broker or MES that hangs. `accepting`: it takes
    connections and never reads or writes on them (a request waits for its answer); otherwise its listen backlog
    is full, so a connection never completes (even a one-way TCP line cannot send)."""

    def __init__(self, accepting: bool = True):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16 if accepting else 0)
        self.port: int = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        if accepting:
            threading.Thread(target=self._accept, daemon=True).start()
        else:  # the one connection a backlog of 0 admits; the kernel drops the next ones' SYNs
            self.held.append(socket.create_connection(("127.0.0.1", self.port)))

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()
