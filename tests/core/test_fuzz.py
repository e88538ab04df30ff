"""Hostile input against a real daemon process: thousands of malformed messages of every
kind, interleaved with good BasicMotions windows on other topics of the same pipeline. Every
good window is answered as scikit-learn answers it and synced upstream, every bad message is
a dead letter with its reason, the counters balance, and memory does not grow across rounds.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import msgpack
import psutil
import pytest
from conftest import Collector, publish_all, write_config

from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

DEVICE = "watch-fz"
ROUNDS = 3
GOOD_PER_ROUND = 6  # windows of 100 samples
BAD_PER_ROUND = 1500
MAX_PAYLOAD = 64 * 1024


def sample(values, **extra) -> dict:
    return {**dict(zip(BASICMOTIONS_CHANNELS, map(float, values), strict=True)), **extra}


def hostile(rng: random.Random, base: list[float]) -> tuple[bytes, str]:
    """One hostile payload and the dead-letter reason it must get."""
    kind = rng.randrange(12)
    if kind == 0:
        return b"[" * 5000 + b"]" * 5000, "malformed"              # RecursionError
    if kind == 1:
        return json.dumps({**sample(base), "gz": 10**400}).encode(), "bad_value"
    if kind == 2:
        return b"\x81\x91\x01\x01", "malformed"                     # unhashable msgpack key
    if kind == 3:
        return json.dumps({**sample(base), "gz": "0.25"}).encode(), "bad_value"
    if kind == 4:
        return json.dumps(sample(base, id=2**70)).encode(), "bad_id"
    if kind == 5:
        return json.dumps(sample(base, id={"nested": [1, 2]})).encode(), "bad_id"
    if kind == 6:
        return json.dumps(sample(base))[:-7].encode(), "malformed"  # truncated
    if kind == 7:
        return json.dumps({"ax": 1.0, "ay": 2.0}).encode(), "missing_field"
    if kind == 8:
        return json.dumps({**sample(base), "gz": None}).encode(), "bad_value"
    if kind == 9:
        return b"{" + b"x" * (MAX_PAYLOAD + 10), "too_large"
    if kind == 10:
        return msgpack.packb([1, 2, 3]), "malformed"                # batch of non-maps
    # random bytes that are neither JSON nor a msgpack map
    while True:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        if data[:1] not in (b"{", b"[", b" ", b"\t", b"\r", b"\n") and not (
                0x80 <= data[0] <= 0x9F or data[0] in (0xDC, 0xDD, 0xDE, 0xDF)):
            return data, "malformed"


def rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.timeout(240)
def test_hostile_stream_costs_only_the_bad_messages(broker, tmp_path, activity_bundle):
    from models import train_activity_model

    test = load_basicmotions("TEST")
    truth = train_activity_model("logreg").predict(test.flat())
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       device_id=DEVICE,
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}],
                       pipeline={"max_payload_bytes": MAX_PAYLOAD},
                       extra="[sync]\nbatch_max_wait_s = 0.05\n")
    answers = Collector(broker, f"edgeml/{DEVICE}/out/activity")
    dlq = Collector(broker, f"edgeml/{DEVICE}/dlq")
    sync = Collector(broker, f"edgeml/{DEVICE}/sync/outputs")
    status = Collector(broker, f"edgeml/{DEVICE}/status")
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(1234)
    expected_reason: dict[str, str] = {}
    good_ids: dict[str, object] = {}
    sizes = []
    try:
        status.wait_for(lambda ms: any(json.loads(m.payload).get("state") == "online"
                                       for m in ms), timeout=60)
        w = 0
        for rnd in range(ROUNDS):
            items: list[tuple[str, bytes]] = []
            bad = []
            for i in range(BAD_PER_ROUND):
                payload, reason = hostile(rng, list(test.X[i % 40][i % 100]))
                topic = f"sensors/bad{rnd}-{i}/imu"
                expected_reason[topic] = reason
                bad.append((topic, payload))
            good = []
            for _ in range(GOOD_PER_ROUND):
                series = w % len(test.X)
                good.append([(f"sensors/good{w}/imu", json.dumps(sample(
                    s, id=f"w{w}-{j}")).encode()) for j, s in enumerate(test.X[series])])
                good_ids[f"w{w}-99"] = truth[series]
                w += 1
            # interleave: the good windows' samples spread among the hostile messages
            streams = [list(reversed(g)) for g in good] + [list(reversed(bad))]
            while any(streams):
                s = rng.choice([s for s in streams if s])
                items.append(s.pop())
            publish_all(broker, items)
            answers.wait_count(len(good_ids), timeout=60)
            dlq.wait_count(len(expected_reason), timeout=60)
            sizes.append(rss(proc.pid))

        got = {msgpack.unpackb(m.payload)["id"]: msgpack.unpackb(m.payload)["output"]["label"]
               for m in answers.messages}
        assert got == good_ids  # every good window, exactly scikit-learn's label
        letters = {}
        for m in dlq.messages:
            rec = json.loads(m.payload)
            letters[rec["topic"]] = rec["reason"]
        assert letters == expected_reason  # every bad message, its own reason
        want = set(good_ids)

        def synced(ms):
            return {r["id"] for m in ms for r in msgpack.unpackb(m.payload)["records"]}
        sync.wait_for(lambda ms: want <= synced(ms), timeout=60)

        def balanced(ms):  # a status taken after the last message was handled
            st = json.loads(ms[-1].payload)["pipelines"]["activity"]
            return st["received"] == len(good_ids) * 100 + len(expected_reason)
        last = json.loads(status.wait_for(balanced, timeout=30)[-1].payload)
        st = last["pipelines"]["activity"]
        assert st["accepted"] == len(good_ids) * 100
        assert st["received"] == st["accepted"] + st["rejected"]
        assert st["rejected"] == len(expected_reason) and st["dropped"] == 0
        assert last["dlq"] == len(expected_reason)
        # memory: no growth across rounds beyond noise
        assert sizes[-1] - sizes[0] < 15, sizes
    finally:
        proc.terminate()
        proc.wait(30)
        for c in (answers, dlq, sync, status):
            c.close()
