"""Two daemons split one stream through an MQTT shared subscription (``shared_group``).

Real mosquitto, two real daemons with different device ids, a real ONNX model (IsolationForest
on single Daphnet samples, no window): every message must be scored by exactly one member of
the group, and the union of both devices' answers must be the whole stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
from conftest import publish_all

from edgeml.host.datasets import DAPHNET_CHANNELS, load_daphnet

N_MESSAGES = 600
GROUP = "gait-workers"


@pytest.fixture(scope="module")
def gait_bundle(tmp_path_factory) -> Path:
    from models import build_gait_anomaly_bundle

    return build_gait_anomaly_bundle(tmp_path_factory.mktemp("gait"), version="1")


def gait_config(path: Path, *, device: str, broker_url: str, data_dir: Path, bundle: Path,
                shared_group: str | None) -> Path:
    group = f'shared_group = "{shared_group}"\n' if shared_group else ""
    path.write_text(f"""
device_id = "{device}"
data_dir = "{data_dir}"
status_interval_s = 0.5

[broker]
url = "{broker_url}"

[sync]
enabled = false

[[pipelines]]
name = "gait"
topics = ["gait/+/acc"]
features = {json.dumps(list(DAPHNET_CHANNELS))}
deadline_ms = 2000
{group}
[[pipelines.models]]
name = "gait"
version = "1"
bundle = "{bundle}"
""")
    return path


def stream(n: int) -> list[tuple[str, bytes]]:
    """Daphnet samples from four patients' topics, each with a unique id."""
    X = load_daphnet().X
    items = []
    for i in range(n):
        body = dict(zip(DAPHNET_CHANNELS, map(float, X[i]), strict=True))
        body["id"] = f"m{i}"
        items.append((f"gait/p{i % 4}/acc", json.dumps(body).encode()))
    return items


def _online(msgs, devices) -> bool:
    seen = {json.loads(m.payload)["device"] for m in msgs
            if json.loads(m.payload).get("state") == "online"}
    return seen >= set(devices)


def test_two_daemons_split_a_shared_stream(broker, collector, daemon_factory, tmp_path,
                                           gait_bundle):
    devices = ("edge-a", "edge-b")
    status = collector("edgeml/+/status")
    out = collector("edgeml/+/out/gait")
    daemons = {}
    for dev in devices:
        cfg = gait_config(tmp_path / f"{dev}.toml", device=dev, broker_url=broker.url,
                          data_dir=tmp_path / dev, bundle=gait_bundle, shared_group=GROUP)
        daemons[dev] = daemon_factory(cfg)
    # each daemon publishes its status after SUBSCRIBE on the same connection: once both
    # are seen online, both shared subscriptions are in place
    status.wait_for(lambda m: _online(m, devices), timeout=30)

    publish_all(broker, stream(N_MESSAGES))
    msgs = out.wait_count(N_MESSAGES, timeout=60)

    recs = [(m.topic.split("/")[1], msgpack.unpackb(m.payload)) for m in msgs]
    ids = [r["id"] for _, r in recs]
    assert len(ids) == N_MESSAGES and len(set(ids)) == N_MESSAGES  # each scored exactly once
    assert set(ids) == {f"m{i}" for i in range(N_MESSAGES)}        # the union is complete
    per_device = {dev: sum(1 for d, _ in recs if d == dev) for dev in devices}
    assert all(n > 0 for n in per_device.values()), per_device     # the stream was split
    assert all(r["output"]["label"] in (1, -1) for _, r in recs)

    # the daemons' own counters agree: together they received and scored N, no more
    sts = {dev: d.status()["pipelines"]["gait"] for dev, d in daemons.items()}
    assert sum(s["received"] for s in sts.values()) == N_MESSAGES
    assert sum(s["scored"] for s in sts.values()) == N_MESSAGES
    assert {dev: s["scored"] for dev, s in sts.items()} == per_device
    # a topic filter of another device is unaffected: each publishes under its own id
    assert {m.topic for m in msgs} == {f"edgeml/{dev}/out/gait" for dev in devices}


def test_without_shared_group_both_daemons_score_everything(broker, collector, daemon_factory,
                                                            tmp_path, gait_bundle):
    """The control case: the same two daemons without ``shared_group`` each score it all."""
    devices = ("edge-a", "edge-b")
    status = collector("edgeml/+/status")
    out = collector("edgeml/+/out/gait")
    for dev in devices:
        cfg = gait_config(tmp_path / f"{dev}.toml", device=dev, broker_url=broker.url,
                          data_dir=tmp_path / dev, bundle=gait_bundle, shared_group=None)
        daemon_factory(cfg)
    status.wait_for(lambda m: _online(m, devices), timeout=30)
    n = 100
    publish_all(broker, stream(n))
    msgs = out.wait_count(2 * n, timeout=60)
    for dev in devices:
        ids = [msgpack.unpackb(m.payload)["id"] for m in msgs
               if m.topic == f"edgeml/{dev}/out/gait"]
        assert sorted(ids) == sorted(f"m{i}" for i in range(n))
