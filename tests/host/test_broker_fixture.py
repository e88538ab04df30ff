"""The broker rig itself: publish/receive through it; stop/restart keeps the port and data."""

from __future__ import annotations

from conftest import publish_all


def test_publish_and_receive(broker, collector):
    c = collector("rig/#")
    publish_all(broker, [("rig/a", b"1"), ("rig/b", b"2")])
    msgs = c.wait_count(2)
    assert sorted((m.topic, m.payload) for m in msgs) == [("rig/a", b"1"), ("rig/b", b"2")]


def test_restart_keeps_port_retained_and_queued(broker, collector):
    port = broker.port
    publish_all(broker, [("rig/retained", b"kept")], qos=1)
    # a persistent QoS 1 session that is offline while messages are queued for it
    c = collector("rig/queued", client_id="rig-persistent", clean=False)
    c.close()
    import paho.mqtt.client as paho
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish("rig/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
    pub.publish("rig/queued", b"q1", qos=1).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()
    broker.restart()
    assert broker.port == port and broker.running
    r = collector("rig/retained")
    assert r.wait_count(1)[0].payload == b"kept"
    q = collector("rig/queued", client_id="rig-persistent", clean=False)
    assert q.wait_count(1)[0].payload == b"q1"
