"""Signed device commands (promote, rollback, retire, set_policy).

When the device has ``trusted_keys``, every command on ``{p}/{d}/cmd`` must carry an Ed25519
signature by one of them. The format (docs/deploy.md, "Signed commands"), so that other tools
can produce it:

* the command is a JSON object with ``cmd``, its arguments (``pipeline``, ``model``,
  ``version``, ``policy``, ``id``, ``deadline`` ...), plus
  ``device`` (the target device id, required), ``counter`` (an integer that must strictly
  increase per (key, device); ``edgeml`` uses the host's time in nanoseconds) and optionally
  ``expires`` (Unix seconds; checked only when the device clock is trusted);
* the signed bytes are ``b"edgeml-cmd/1\\n"`` followed by the canonical JSON of the object
  *without* its ``sig`` member: keys sorted, separators ``,`` and ``:``, UTF-8, no NaN;
* ``sig`` is ``{"alg": "ed25519", "key": <key id>, "value": <base64 of the 64-byte
  signature>}``; the key id is the first 16 hex digits of sha256(raw public key)
  (:func:`edgeml.keys.key_id`).

Every member except ``sig`` is covered by the signature. The device keeps the highest counter
it accepted per (key id, device) in ``data_dir/state/cmd_counters.json`` (written atomically
*before* the command is carried out), so a captured command can never be replayed, not even
after a restart.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from pathlib import Path
from typing import Any

from edgeml.storage.fs import atomic_write

log = logging.getLogger("edgeml.control.signing")

DOMAIN = b"edgeml-cmd/1\n"
ALG = "ed25519"
#: before this wall time (2024-01-01) the device clock is not trusted (no RTC, no NTP yet)
TRUSTED_CLOCK_AFTER = 1_704_067_200.0
MAX_KEYS_REMEMBERED = 1000
MAX_COUNTER = 2**63 - 1


class CommandRefused(Exception):
    """A command the device will not carry out; ``reason`` starts with a short kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def canonical_bytes(doc: dict) -> bytes:
    """The bytes a command's signature covers: the domain line and the canonical JSON of
    every member except ``sig``."""
    body = {k: v for k, v in doc.items() if k != "sig"}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False, allow_nan=False).encode("utf-8")


def sign_command(doc: dict, private_key: Any, *, counter: int | None = None,
                 expires_in_s: float | None = None) -> dict:
    """A signed copy of ``doc`` (which must name its ``device``): counter (default: the
    host's time in ns), optional expiry, signature."""
    from edgeml.keys import key_id

    if not doc.get("device"):
        raise ValueError("a signed command must name its target device")
    out = {k: v for k, v in doc.items() if k != "sig" and v is not None}
    out["counter"] = time.time_ns() if counter is None else counter
    if expires_in_s is not None:
        out["expires"] = round(time.time() + expires_in_s, 3)
    value = private_key.sign(canonical_bytes(out))
    out["sig"] = {"alg": ALG, "key": key_id(private_key),
                  "value": base64.b64encode(value).decode("ascii")}
    return out


def clock_trusted(now: float | None = None) -> bool:
    return (time.time() if now is None else now) >= TRUSTED_CLOCK_AFTER


class CounterFile:
    """The highest counter accepted per ``key id/device``, kept across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marks: dict[str, int] = {}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            marks = doc.get("counters", {}) if isinstance(doc, dict) else {}
            self.marks = {k: v for k, v in marks.items()
                          if isinstance(k, str) and isinstance(v, int)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            # refusing every command until an operator looks is safer than accepting replays
            log.error("cannot read %s (%s): every counter starts at the current time",
                      path, exc)
            self.marks = {"*": time.time_ns()}

    def last(self, key: str, device: str) -> int | None:
        got = self.marks.get(f"{key}/{device}")
        floor = self.marks.get("*")
        if floor is not None and (got is None or got < floor):
            return floor
        return got

    def accept(self, key: str, device: str, counter: int) -> None:
        self.marks[f"{key}/{device}"] = counter
        while len(self.marks) > MAX_KEYS_REMEMBERED:
            self.marks.pop(next(iter(self.marks)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"version": 1, "counters": self.marks}, sort_keys=True).encode()
        atomic_write(self.path, data)


class CommandVerifier:
    """Checks a command against the trusted keys; records its counter when it passes."""

    def __init__(self, trusted_keys: list, device_id: str, counters: CounterFile, *,
                 clock=time.time) -> None:
        self.keys: dict = {}
        if trusted_keys:  # none: do not map cryptography's OpenSSL (~6 MB RSS) for nothing
            from edgeml.keys import key_id

            self.keys = {key_id(k): k for k in trusted_keys}
        self.device_id = device_id
        self.counters = counters
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def verify(self, doc: dict) -> str | None:
        """Raise :class:`CommandRefused` unless ``doc`` is a fresh command signed for this
        device by a trusted key; returns the signer's key id (None without trusted keys)."""
        if not self.keys:
            return None
        from cryptography.exceptions import InvalidSignature

        sig = doc.get("sig")
        if sig is None:
            raise CommandRefused("unsigned", "this device only obeys commands signed by a "
                                 "trusted key (edgeml promote|rollback|retire --sign-key)")
        if not isinstance(sig, dict) or not isinstance(sig.get("key"), str) or \
                not isinstance(sig.get("value"), str) or sig.get("alg", ALG) != ALG:
            raise CommandRefused("bad signature", "'sig' must be {\"alg\": \"ed25519\", "
                                 "\"key\": KEY_ID, \"value\": BASE64}")
        kid = sig["key"]
        key = self.keys.get(kid)
        if key is None:
            raise CommandRefused("unknown key", f"signed by key {kid[:32]!r}, which is not "
                                 "in this device's trusted_keys")
        try:
            value = base64.b64decode(sig["value"], validate=True)
            key.verify(value, canonical_bytes(doc))
        except (binascii.Error, ValueError, InvalidSignature):
            raise CommandRefused("bad signature", f"the signature does not verify with key "
                                 f"{kid} (altered in transit, or signed over other bytes)") \
                from None
        device = doc.get("device")
        if device != self.device_id:
            raise CommandRefused("wrong device", f"the command is meant for device "
                                 f"{device!r}, this is {self.device_id!r}")
        counter = doc.get("counter")
        if isinstance(counter, bool) or not isinstance(counter, int) or \
                not 0 <= counter <= MAX_COUNTER:
            raise CommandRefused("bad counter", "'counter' must be an integer in 0..2**63-1")
        last = self.counters.last(kid, device)
        if last is not None and counter <= last:
            raise CommandRefused("replay", f"counter {counter} is not above the last one "
                                 f"accepted from key {kid} ({last}): a replayed or "
                                 "out-of-order command")
        expires = doc.get("expires")
        if expires is not None:
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                raise CommandRefused("bad signature", "'expires' must be a number")
            now = self._clock()
            if clock_trusted(now) and now > expires:
                raise CommandRefused("expired", f"the command expired {now - expires:.0f} s "
                                     "ago (by this device's clock)")
        self.counters.accept(kid, device, counter)
        return kid
