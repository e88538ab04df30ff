"""The device's retained status document (docs/topics.md), built on the event loop from what
each part reports about itself. The transport only ever sends bytes made here."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from edgeml import __version__


def safe(fn: Callable[[], Any]) -> Any:
    """A part that cannot report must not stop the rest of the status going out."""
    try:
        return fn()
    except Exception as exc:
        return {"error": str(exc)}


def offline(device: str, reason: str) -> dict:
    """The last will: what the broker says for us when we vanish."""
    return {"device": device, "state": "offline", "reason": reason}


def build(*, device: str, state: str, started: float, profile: str, pipelines: dict,
          received_per_s: float, dlq: int, load_errors: list[str], reloads: int,
          recovered_rows: int, transport: Any = None, outbox: Any = None,
          outbox_overflow: int = 0, uplink: Any = None, control: Any = None,
          publish_errors: int = 0) -> dict:
    now = time.time()
    status: dict[str, Any] = {
        "device": device, "state": state, "ts": now,
        "uptime_s": round(now - started, 3), "edgeml": __version__,
        "profile": profile, "pid": os.getpid(), "received_per_s": received_per_s,
        "pipelines": pipelines, "dlq": dlq, "load_errors": load_errors[-10:],
        "reloads": reloads, "recovered_rows": recovered_rows,
        "publish_errors": publish_errors,
    }
    if transport is not None:
        status["mqtt"] = {"connected": transport.connected, "connects": transport.connects,
                          "disconnects": transport.disconnects}
    if outbox is not None:
        status["outbox"] = safe(outbox.stats)  # in-memory counters, cheap
        if isinstance(status["outbox"], dict):
            status["outbox"]["overflow_dropped"] = outbox_overflow
    if uplink is not None:
        status["uplink"] = safe(lambda: uplink.stats)
    if control is not None:
        status["deploy"] = safe(control.status)
    return status
