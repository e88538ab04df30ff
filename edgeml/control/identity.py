"""Who this daemon is: its instance id, the start-up twin check, and the trust warning.

* ``data_dir/state/instance.json`` holds an instance id made the first time a data dir is
  used. It is published in the retained status (``identity``), and in the last will.
* At start, before the device's own connection announces anything, a short side connection
  (its own client id, so it never takes over the running device's session) reads the
  retained ``{p}/{d}/status``:
  - ``online`` with another instance id: a **twin** (a second daemon with this device_id and
    another data dir). It refuses to run (:class:`TwinDeviceError`) and says so on
    ``{p}/{d}/alerts`` (``twin_device``). A kill -9 and restart with the same data dir is the
    same instance: not a twin.
  - the published sequence numbers (``identity.seq``, per pipeline) are above what the local
    raw log would hand out next: the data dir was restored from a backup (or lost its tail
    and its mark): the raw log continues past the published numbers (plus a margin of
    :data:`RESTORE_MARGIN`), an alert ``data_dir_restored`` says so, and no record id
    ever repeats one the fleet already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from edgeml.errors import EdgemlError
from edgeml.storage.fs import atomic_write

log = logging.getLogger("edgeml.control.identity")

INSTANCE_FILE = "instance.json"
#: a restored data dir continues this far past the last published sequence number (the
#: status is published every few seconds; this covers that many messages per pipeline)
RESTORE_MARGIN = 1_000_000
CHECK_TIMEOUT_S = 5.0


class TwinDeviceError(EdgemlError):
    """Another daemon with this device_id (and another data dir) is online."""

    kind = "twin_device"


def warn_if_untrusted(trusted_keys: Any, cmd_topic: str) -> None:
    """Without trusted keys, commands (and deployments) are authenticated by nobody but the
    broker: say so once at start."""
    if not trusted_keys:
        log.warning("trusted_keys is empty: commands on %s and deployments are NOT signed; "
                    "anyone the broker's ACLs let publish there can promote, roll back, retire "
                    "and push models (set trusted_keys, see docs/operations.md)", cmd_topic)


class Identity:
    """The instance id of this data dir (created once, kept)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "state" / INSTANCE_FILE
        self.instance = self._load()
        self.restored: dict[str, int] = {}

    def _load(self) -> str:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            inst = doc.get("instance") if isinstance(doc, dict) else None
            if isinstance(inst, str) and 8 <= len(inst) <= 64:
                return inst
            log.error("%s holds no instance id; making a new one", self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s); making a new instance id", self.path, exc)
        inst = secrets.token_hex(8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"instance": inst, "created": time.time()}).encode())
        log.info("new instance id %s (%s)", inst, self.path)
        return inst

    def status(self, seqs: dict[str, int]) -> dict:
        """The ``identity`` member of the retained status."""
        return {"instance": self.instance, "seq": seqs}


async def check_identity(identity: Identity, *, connector: Any, settings: Any, prefix: str,
                         device_id: str, rawlogs: dict[str, Any],
                         on_alert: Any = None,
                         timeout: float = CHECK_TIMEOUT_S) -> dict | None:
    """Read the retained status through a side connection; raise :class:`TwinDeviceError`
    for a twin; move the raw logs past published sequence numbers. Returns the retained
    status seen (or None)."""
    status_topic = f"{prefix}/{device_id}/status"
    alerts_topic = f"{prefix}/{device_id}/alerts"
    side = dataclasses.replace(settings, client_id=f"{settings.client_id or device_id}"
                               f"-idcheck-{secrets.token_hex(3)}", clean_start=True)
    try:
        transport = connector(side, require_connection=True)
        await transport.__aenter__()
    except Exception as exc:  # the device's own connection reports the broker problem
        log.warning("identity check skipped: cannot connect a side connection: %s", exc)
        return None
    try:
        try:
            doc = await _retained(transport, status_topic, timeout)
        except Exception as exc:  # ACLs may forbid the echo topic: do not block the start
            log.warning("identity check skipped: %s", exc)
            return None
        if doc is None:
            return None
        other = (doc.get("identity") or {}).get("instance") if isinstance(
            doc.get("identity"), dict) else doc.get("instance")
        state = doc.get("state")
        if other and other != identity.instance and state != "offline":
            msg = (f"another daemon with device_id {device_id!r} is online (instance {other}, "
                   f"pid {doc.get('pid')}); this one (instance {identity.instance}, data dir "
                   f"{identity.path.parent.parent}) refuses to run: give each daemon its own "
                   "device_id, or stop the other one")
            alert = {"device": device_id, "pipeline": None, "kind": "twin_device",
                     "ts": time.time(), "instance": identity.instance, "other": other,
                     "reason": msg}
            with contextlib.suppress(Exception):
                await transport.publish(alerts_topic, json.dumps(alert).encode(), qos=1,
                                        timeout=2.0)
            raise TwinDeviceError(msg)
        seqs = (doc.get("identity") or {}).get("seq") if isinstance(
            doc.get("identity"), dict) else None
        for name, published in (seqs or {}).items():
            rawlog = rawlogs.get(name)
            if rawlog is None or not isinstance(published, int):
                continue
            local = rawlog.next_seq
            if published > local:
                new = published + RESTORE_MARGIN
                rawlog.advance_seq(new)
                identity.restored[name] = new
                why = "restored from a backup" if other == identity.instance else \
                    "new or replaced (another instance published before)"
                msg = (f"pipeline {name}: the fleet saw seq {published}, this data dir would "
                       f"hand out {local} next: it was {why}; continuing at seq {new} so no "
                       "record id repeats")
                log.warning("%s", msg)
                alert = {"device": device_id, "pipeline": name, "kind": "data_dir_restored",
                         "ts": time.time(), "published_seq": published, "local_seq": local,
                         "continue_at": new, "instance": identity.instance, "reason": msg}
                with contextlib.suppress(Exception):
                    await transport.publish(alerts_topic, json.dumps(alert).encode(), qos=1,
                                            timeout=2.0)
                if on_alert is not None:  # into the outbox too: synced upstream
                    on_alert(name, "data_dir_restored", {k: v for k, v in alert.items() if k
                                                         not in ("device", "pipeline", "kind",
                                                                 "ts")})
        return doc
    finally:
        with contextlib.suppress(Exception):
            await transport.close()


async def _retained(transport: Any, topic: str, timeout: float) -> dict | None:
    """The retained message on ``topic`` (None when there is none): subscribe, then a round
    trip on a private topic proves every retained message has arrived."""
    nonce_topic = f"{topic}/_idcheck/{secrets.token_hex(4)}"
    nonce = secrets.token_hex(8).encode()
    await transport.subscribe([(topic, 1), (nonce_topic, 1)])
    await transport.publish(nonce_topic, nonce, qos=1, timeout=timeout)
    found: dict | None = None

    async def read() -> None:
        nonlocal found
        async for m in transport.messages():
            if m.topic == nonce_topic and m.payload == nonce:
                return
            if m.topic == topic and m.payload:
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    doc = json.loads(m.payload)
                    if isinstance(doc, dict):
                        found = doc
    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        log.warning("identity check: no echo from the broker within %.0f s", timeout)
    return found
