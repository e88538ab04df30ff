"""Rollouts as people and scripts see them: a table for `edgeml status --db` and
`edgeml rollout --list`, and one JSON document per rollout."""

from __future__ import annotations

import dataclasses
import time

from edgeml.host.rollout.store import Rollout, RolloutStore


def rollout_doc(store: RolloutStore, r: Rollout) -> dict:
    """Everything about one rollout: settings, state, waves with verdicts, devices."""
    return {**dataclasses.asdict(r),
            "waves_detail": [dataclasses.asdict(w) for w in store.waves(r.id)],
            "devices": {d: dataclasses.asdict(s) for d, s in store.devices(r.id).items()}}


def summarize(store: RolloutStore, r: Rollout, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    waves = store.waves(r.id)
    devices = store.devices(r.id)
    current = next((w for w in waves if w.wave == r.current_wave), None)
    return {"id": r.id, "state": r.state, "model": r.model, "version": r.version,
            "group": r.group, "role": r.role, "wave": min(r.current_wave + 1, len(r.waves)),
            "waves": len(r.waves), "wave_state": current.state if current else None,
            "active": sum(d.state == "active" for d in devices.values()),
            "devices": len(devices), "reason": r.reason,
            "updated_s_ago": round(now - r.updated, 1)}


def rollouts_table(store: RolloutStore, *, running_only: bool = True) -> str:
    rows = [summarize(store, r) for r in store.recent(50)
            if not running_only or r.state == "running"]
    if not rows:
        return "no running rollout" if running_only else "no rollout yet"
    header = ("ROLLOUT", "STATE", "VERSION", "GROUP", "ROLE", "WAVE", "ACTIVE", "NOTE")
    table = [header]
    for s in rows:
        wave = f"{s['wave']}/{s['waves']}" + (f" {s['wave_state']}" if s["wave_state"]
                                               and s["state"] == "running" else "")
        table.append((s["id"], s["state"], f"{s['model']}:{s['version']}", s["group"],
                      s["role"], wave, f"{s['active']}/{s['devices']}", s["reason"] or ""))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
                  + [str(row[-1])]).rstrip() for row in table)
