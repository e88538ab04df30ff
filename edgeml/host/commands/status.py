"""``edgeml status``: the fleet at a glance, from every device's retained status."""

from __future__ import annotations

import argparse
import time

HELP = ("show every device: online, pipelines, model versions and roles, rates, backlog, "
        "drift")
DESCRIPTION = """\
Subscribe to {p}/+/status (retained, refreshed by each daemon every status_interval_s; the
broker publishes the last will "offline" when a device drops off) and print one row per
device: state, when it last reported, each pipeline's active versions and roles, messages per
second, backlog (input queue + outbox), champion/canary agreement and input drift (the
level and largest channel PSI of the last drift window, and the drift and sensor-health
alerts that are raised now).

Without --once the table is printed again whenever a device reports (Ctrl-C ends it); with
--json each report is one JSON line (--once --json: one JSON object keyed by device).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.commands.push import add_connection_arguments

    p.add_argument("--once", action="store_true",
                   help="print the current state once and exit")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--device", action="append", default=[], metavar="ID",
                   help="only this device (repeatable)")
    p.add_argument("--stale-after", type=float, default=60.0, metavar="SECONDS",
                   help="show a device as stale when its last report is older than this "
                        "(default: %(default)s)")
    p.add_argument("--db", metavar="URL",
                   help="also list the running rollouts kept in this fleet database "
                        "(sqlite:///PATH or postgresql://...)")
    add_connection_arguments(p, timeout=10.0)


def rollouts_section(db_url: str | None) -> str | None:
    """The running rollouts in ``db_url`` as a table (None without --db)."""
    if not db_url:
        return None
    from edgeml.host.rollout.db import Database
    from edgeml.host.rollout.store import RolloutStore
    from edgeml.host.rollout.view import rollouts_table

    with Database(db_url, must_exist=True) as db:
        return rollouts_table(RolloutStore(db))


def summarize(device: str, doc: dict, now: float, stale_after: float) -> dict:
    """One device's row: the fields the table shows, also the --json shape."""
    ts = doc.get("ts")
    age = round(now - ts, 1) if isinstance(ts, (int, float)) else None
    state = str(doc.get("state") or "unknown")
    if state == "online" and age is not None and age > stale_after:
        state = "stale"
    pipes = {}
    backlog = 0
    for name, p in (doc.get("pipelines") or {}).items():
        if not isinstance(p, dict):
            continue
        backlog += int(p.get("queue_depth") or 0)
        pipes[name] = {
            "policy": p.get("policy"),
            "models": [{"model": v.get("model"), "version": v.get("version"),
                        "role": v.get("role"), "rows": v.get("rows"),
                        "errors": v.get("errors")}
                       for v in p.get("versions") or [] if isinstance(v, dict)],
            "canary_agreement": p.get("canary_agreement"),
            "drift": drift_summary(p.get("drift")),
        }
    outbox = doc.get("outbox") or {}
    if isinstance(outbox, dict):
        backlog += int(outbox.get("backlog") or 0)
    deploy = doc.get("deploy") or {}
    watches = {n: p.get("watch") for n, p in (deploy.get("pipelines") or {}).items()
               if isinstance(p, dict) and p.get("watch")}
    return {"device": device, "state": state, "online": state == "online",
            "last_seen_s": age, "pipelines": pipes,
            "received_per_s": doc.get("received_per_s"), "backlog": backlog,
            "groups": deploy.get("groups") or [], "watch": watches,
            "profile": doc.get("profile"), "edgeml": doc.get("edgeml")}


def drift_summary(d: object) -> dict | None:
    """A pipeline's drift in the status: the last input window's level and largest channel
    PSI, the largest output PSI per version and the alerts raised now; ``enabled`` false
    when ``[drift]`` is off. None when the device reports no drift section (an edgeml
    without one)."""
    if not isinstance(d, dict):
        return None
    psi = {k: v for k, v in (d.get("psi") or {}).items() if isinstance(v, (int, float))}
    channel = max(psi, key=psi.get) if psi else None
    outputs = {}
    for key, figs in (d.get("outputs") or {}).items():
        vals = [v for k, v in (figs or {}).items()
                if k.endswith("psi") and isinstance(v, (int, float))]
        if vals:
            outputs[key] = max(vals)
    alerts = [str(a) for a in d.get("alerts") or []]
    return {"enabled": d.get("enabled", True), "level": d.get("level"),
            "max_psi": psi.get(channel) if channel else None,
            "channel": channel, "output_psi": outputs, "alerts": alerts,
            "windows": d.get("windows"), "reference": d.get("reference")}


def _drift(row: dict) -> str:
    parts = []
    for name, p in row["pipelines"].items():
        d = p.get("drift")
        if d is None:
            continue
        if not d["enabled"]:
            text = "off"
        elif d["max_psi"] is not None:
            text = f"{d['level']} {d['channel']} {d['max_psi']:.2f}"
        else:
            text = "no reference" if d["reference"] is None else "no window yet"
        if d["alerts"]:
            text += " ALERT " + ",".join(d["alerts"])
        parts.append(f"{name}: {text}" if len(row["pipelines"]) > 1 else text)
    return "; ".join(parts) or "-"


def _models(row: dict) -> str:
    parts = []
    for name, p in row["pipelines"].items():
        ms = ", ".join(f"{m['model']}:{m['version']} {m['role']}" for m in p["models"])
        parts.append(f"{name}[{ms or 'none'}]")
    return "; ".join(parts) or "-"


def _canary(row: dict) -> str:
    vals = [p["canary_agreement"] for p in row["pipelines"].values()
            if p["canary_agreement"] is not None]
    return ", ".join(f"{v:.2f}" for v in vals) or "-"


def render(rows: list[dict]) -> str:
    header = ("DEVICE", "STATE", "LAST SEEN", "IN/S", "BACKLOG", "CANARY", "DRIFT", "MODELS")
    table = [header]
    for r in rows:
        seen = "-" if r["last_seen_s"] is None else f"{r['last_seen_s']:g}s ago"
        rate = "-" if r["received_per_s"] is None else f"{r['received_per_s']:g}"
        watch = " (watching " + ", ".join(w["champion"] for w in r["watch"].values()) + ")" \
            if r["watch"] else ""
        table.append((r["device"], r["state"], seen, rate, str(r["backlog"]), _canary(r),
                      _drift(r), _models(r) + watch))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import json

    from edgeml.host.fleet import Fleet

    wanted = set(args.device)

    def keep(dev: str) -> bool:
        return not wanted or dev in wanted

    async def once() -> dict[str, dict]:
        async with Fleet(_settings(args), topic_prefix=args.topic_prefix) as fleet:
            return await fleet.statuses(timeout=args.timeout)

    rollouts = rollouts_section(getattr(args, "db", None))
    if args.once:
        docs = asyncio.run(once())
        now = time.time()
        rows = [summarize(d, docs[d], now, args.stale_after) for d in sorted(docs) if keep(d)]
        if args.json:
            print(json.dumps({r["device"]: r for r in rows}, indent=2, sort_keys=True))
        elif rows:
            print(render(rows))
        else:
            print("no device has reported on "
                  f"{args.topic_prefix}/+/status at {args.broker}")
        if rollouts is not None and not args.json:
            print(f"\n{rollouts}")
        return 0

    async def follow() -> None:
        latest: dict[str, dict] = {}
        printed = 0.0
        async with Fleet(_settings(args), topic_prefix=args.topic_prefix) as fleet:
            async for dev, doc in fleet.watch_statuses():
                if not keep(dev):
                    continue
                now = time.time()
                if args.json:
                    print(json.dumps(summarize(dev, doc, now, args.stale_after),
                                     sort_keys=True), flush=True)
                    continue
                latest[dev] = doc
                if now - printed < 1.0 and doc.get("state") == "online":
                    continue  # at most one table a second, but a state change at once
                printed = now
                rows = [summarize(d, latest[d], now, args.stale_after) for d in sorted(latest)]
                print(f"\n{time.strftime('%H:%M:%S')}\n{render(rows)}", flush=True)
                if args.db:
                    print(f"\n{rollouts_section(args.db)}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow())
    return 0


def _settings(args: argparse.Namespace):
    from edgeml.host.commands.push import fleet_settings

    return fleet_settings(args)
