"""Can a record the NATS MQTT layer acknowledged be missing from JetStream?

A device publishes numbered QoS 1 messages on ``edgeml/<d>/sync/outputs`` to a nats-server's
MQTT port (paho, MQTT 3.1.1, as the edgeml uplink does) and counts the PUBACKs. Two places
are then read back and compared with the acknowledged set (missing = acknowledged, not there):

  * ``user``: a user stream ``EDGEML_SYNC`` on subjects ``edgeml.*.sync.>`` (what a consumer
    of the plain subjects sees; the MQTT layer hands it a plain publish);
  * ``mqtt``: a durable consumer on the MQTT layer's own stream ``$MQTT_msgs`` filtered to
    ``$MQTT.msgs.edgeml.*.sync.>`` (where the MQTT layer stores a QoS 1 message before its
    PUBACK; the stream has interest retention, so it keeps only what a consumer still wants).

Scenarios:
  * ``created_after``: one server; the device syncs before the stream / consumer exist, then
    again after they were created;
  * ``kill_user_leader``: a 3-node cluster, both in place first (replicas 3); the device
    publishes through a node that leads neither, and the user stream's leader is SIGKILLed
    mid-stream;
  * ``kill_mqtt_leader``: the same, killing the leader of ``$MQTT_msgs`` instead.

Prints a table and writes benchmarks/results/nats_loss.json.

    python benchmarks/nats_loss.py [--messages 3000] [--rate 1000] [--rounds 3]
    # how long a stream of our own loses records after its leader dies (a longer run):
    python benchmarks/nats_loss.py --messages 15000 --rounds 3 --scenarios kill_user_leader \
        --out benchmarks/results/nats_loss_window.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats
import paho.mqtt.client as paho
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nats_servers import NatsCluster, NatsServer, nats_server_path

USER_STREAM = "EDGEML_SYNC"
MQTT_STREAM = "$MQTT_msgs"
DURABLE = "loss-probe"
TOPIC = "edgeml/d1/sync/outputs"


class Device:
    """A paho publisher in its own thread: numbered QoS 1 messages at a paced rate."""

    def __init__(self, host: str, port: int) -> None:
        self.sent: list[tuple[int, paho.MQTTMessageInfo]] = []
        self.pubacks = 0
        self.disconnects = 0
        self._acked_mids: set[int] = set()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="loss-device",
                             clean_session=False, protocol=paho.MQTTv311)
        self.c.max_inflight_messages_set(20)
        self.c.max_queued_messages_set(0)
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect
        self.c.reconnect_delay_set(0.1, 1.0)
        self.c.connect(host, port)
        self.c.loop_start()

    def _on_publish(self, client, userdata, mid, rc=None, props=None) -> None:
        self.pubacks += 1  # paho's thread only
        self._acked_mids.add(mid)

    def _on_disconnect(self, client, userdata, flags, rc=None, props=None) -> None:
        self.disconnects += 1

    @property
    def acked(self) -> set[int]:
        """The numbers whose PUBACK came (a message published while the link was down is
        queued by paho and sent on reconnect; its PUBACK counts like any other)."""
        return {n for n, info in self.sent if info.mid in self._acked_mids}

    def publish(self, start: int, count: int, rate: float) -> None:
        t0 = time.monotonic()
        for i in range(count):
            self.sent.append((start + i, self.c.publish(TOPIC, str(start + i).encode(), qos=1)))
            delay = t0 + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def wait_acked(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pubacks < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


async def _prepare(url: str, replicas: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=USER_STREAM, subjects=["edgeml.*.sync.>"],
                                     num_replicas=replicas))
    await js.add_consumer(MQTT_STREAM, ConsumerConfig(
        durable_name=DURABLE, filter_subject="$MQTT.msgs.edgeml.*.sync.>",
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL))
    await nc.close()


async def _drain(sub, want: set[int], ack: bool, limit_s: float = 30.0) -> set[int]:
    """Fetch until every wanted number came, or nothing new came for 5 s (bounded): a
    consumer whose leader is being elected answers with timeouts for a while."""
    got: set[int] = set()
    t0 = last_new = time.monotonic()
    while time.monotonic() - t0 < limit_s and not want <= got:
        try:
            msgs = await sub.fetch(1000, timeout=1.0)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            if time.monotonic() - last_new > 5.0:
                break
            continue
        except Exception:  # no leader yet, reconnecting
            await asyncio.sleep(0.5)
            continue
        for m in msgs:
            got.add(int(m.data))
            if ack:
                await m.ack()
        last_new = time.monotonic()
    return got


async def _read(urls: list[str], want: set[int]) -> tuple[set[int], set[int], int]:
    """Everything in the user stream, everything the $MQTT_msgs consumer delivers, and the
    user stream's own message count."""
    nc = await nats.connect(servers=urls)
    js = nc.jetstream()
    t0 = time.monotonic()
    while True:
        try:
            stored = (await js.stream_info(USER_STREAM)).state.messages
            sub = await js.pull_subscribe("edgeml.*.sync.>", durable=None, stream=USER_STREAM)
            sub2 = await js.pull_subscribe_bind(DURABLE, MQTT_STREAM)
            break
        except Exception:
            if time.monotonic() - t0 > 30:
                raise
            await asyncio.sleep(0.5)
    user = await _drain(sub, want, ack=True)  # unacknowledged, a consumer stops at 1,000
    mqtt = await _drain(sub2, want, ack=True)
    await nc.close()
    return user, mqtt, stored


async def _leaders(url: str) -> dict[str, str]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    out = {}
    for name in (USER_STREAM, MQTT_STREAM):
        info = await js.stream_info(name)
        out[name] = info.cluster.leader if info.cluster else ""
    await nc.close()
    return out


async def _separate_leaders(url: str) -> dict[str, str]:
    """Ask the user stream's leader to step down until the two streams have different
    leaders, so each scenario kills one of them only."""
    for _ in range(6):
        leaders = await _leaders(url)
        if leaders[USER_STREAM] != leaders[MQTT_STREAM]:
            return leaders
        nc = await nats.connect(url)
        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{USER_STREAM}", b"", timeout=5)
        await nc.close()
        await asyncio.sleep(1.0)
    return leaders


def _row(name: str, acked: set[int], user: set[int], mqtt: set[int], **extra) -> dict:
    user_gap = sorted(acked - user)
    return {"scenario": name, "acked": len(acked),
            "user_missing": len(user_gap), "mqtt_missing": len(acked - mqtt),
            "user_missing_first": user_gap[0] if user_gap else None,
            "user_missing_last": user_gap[-1] if user_gap else None, **extra}


def created_after(workdir: Path, n: int, rate: float) -> dict:
    s = NatsServer(workdir / "single").start()
    try:
        dev = Device(s.host, s.mqtt_port)
        dev.publish(0, n, rate)  # before anything upstream exists
        dev.wait_acked(n, 30)
        asyncio.run(_prepare(s.url, 1))
        dev.publish(n, n, rate)
        dev.wait_acked(2 * n, 30)
        dev.close()
        user, mqtt, stored = asyncio.run(_read([s.url], dev.acked))
        return _row("created_after", dev.acked, user, mqtt, before_creation=n,
                    user_stream_messages=stored)
    finally:
        s.stop()


def kill_leader(workdir: Path, n: int, rate: float, which: str) -> dict:
    c = NatsCluster(workdir / f"cluster-{which}").start()
    try:
        # the MQTT layer creates its streams on the first MQTT connection
        Device(c.nodes[0].host, c.nodes[0].mqtt_port).close()
        asyncio.run(_prepare(c.nodes[0].url, 3))
        leaders = asyncio.run(_separate_leaders(c.nodes[0].url))
        victim_name = leaders[USER_STREAM if which == "user" else MQTT_STREAM]
        victim = next(x for x in c.nodes if x.name == victim_name)
        # publish through a node that leads neither stream when possible
        others = [x for x in c.nodes if x.name not in leaders.values()] or \
            [x for x in c.nodes if x is not victim]
        via = others[0]
        dev = Device(via.host, via.mqtt_port)
        t = threading.Thread(target=dev.publish, args=(0, n, rate))
        t0 = time.monotonic()
        t.start()
        dev.wait_acked(n // 3, 30)
        killed_at = len(dev.acked)
        victim.kill()
        t.join()
        dev.wait_acked(n, 60)
        elapsed = time.monotonic() - t0
        pubacks_in_time = dev.pubacks >= n  # else the wait gave up: "more than elapsed"
        dev.close()
        victim.start()
        c.wait_meta_leader()
        urls = [x.url for x in c.nodes]
        user, mqtt, stored = asyncio.run(_read(urls, dev.acked))
        return _row(f"kill_{which}_leader", dev.acked, user, mqtt, killed_after=killed_at,
                    user_stream_messages=stored,
                    sent=len(dev.sent), device_disconnects=dev.disconnects,
                    all_acked_after_s=round(elapsed, 1),
                    pubacks_in_time=pubacks_in_time,
                    paced_s=round(n / rate, 1), leaders=leaders, via=via.name)
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="messages per run")
    ap.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of the cluster runs")
    ap.add_argument("--scenarios", default="created_after,kill_user_leader,kill_mqtt_leader",
                    help="comma-separated scenarios to run (default: all three)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nats_loss.json"),
                    help="where to write the JSON results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        chosen = set(args.scenarios.split(","))
        if "created_after" in chosen:
            rows.append(created_after(work / "a", args.messages // 3, args.rate))
        for r in range(args.rounds):
            if "kill_user_leader" in chosen:
                rows.append(kill_leader(work / f"u{r}", args.messages, args.rate, "user"))
            if "kill_mqtt_leader" in chosen:
                rows.append(kill_leader(work / f"m{r}", args.messages, args.rate, "mqtt"))
    print(f"{'scenario':<20} {'acked':>7} {'missing: user stream':>22} "
          f"{'missing: $MQTT_msgs consumer':>30} {'last PUBACK after':>18}")
    for row in rows:
        took = "-"
        if "paced_s" in row:
            more = "" if row.get("pubacks_in_time", True) else ">"
            took = f"{more}{row['all_acked_after_s']} s / {row['paced_s']} s"
        print(f"{row['scenario']:<20} {row['acked']:>7} {row['user_missing']:>22} "
              f"{row['mqtt_missing']:>30} {took:>18}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([nats_server_path() or "nats-server", "--version"],
                             capture_output=True, text=True).stdout.strip()
    out.write_text(json.dumps({"host": platform.node(), "python": platform.python_version(),
                               "nats_server": version, "args": vars(args), "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
