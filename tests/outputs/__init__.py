"""Shared by the output tests: a flow whose verdict each request chooses (`data=ng` is NG), one frame, a call."""

from __future__ import annotations

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
