"""The daemon against a broker that wants TLS and a password (certificates made at test time)."""

from __future__ import annotations

import datetime
import json
import subprocess

import pytest
from conftest import write_config

from edgeml.config import load_config
from edgeml.errors import TransportError
from edgeml.host.broker import MosquittoBroker
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions


def make_ca_and_server(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgeml test CA"))
          .issuer_name(name("edgeml test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: tmp_path / f"{n}.pem" for n in ("ca", "server", "server-key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["server-key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    for p in paths.values():
        p.chmod(0o644)
    return paths


@pytest.fixture
def secure_broker(tmp_path):
    certs = make_ca_and_server(tmp_path)
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "device", "s3cret"], check=True)
    pwfile.chmod(0o644)
    listener = "\n".join([
        "allow_anonymous false", f"password_file {pwfile}",
        f"cafile {certs['ca']}", f"certfile {certs['server']}", f"keyfile {certs['server-key']}",
    ])
    b = MosquittoBroker(tmp_path / "secure", listener_config=listener).start()
    try:
        yield b, certs
    finally:
        b.stop()


def test_daemon_over_tls_with_password(secure_broker, tmp_path, daemon_factory, activity_bundle):
    b, certs = secure_broker
    (tmp_path / "pw").write_text("s3cret\n")
    extra_broker = (f'username = "device"\npassword_file = "{tmp_path / "pw"}"\n'
                    f'ca_file = "{certs["ca"]}"\n')
    cfg = write_config(tmp_path / "edgeml.toml", broker=b, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}],
                       extra="[sync]\nenabled = false")
    text = cfg.read_text().replace(f'url = "{b.url}"',
                                   f'url = "mqtts://127.0.0.1:{b.port}"\n{extra_broker}')
    cfg.write_text(text)
    assert load_config(cfg).broker.tls
    d = daemon_factory(cfg)
    # a paho client with the same credentials and CA reads the answer
    import paho.mqtt.client as paho
    got = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.username_pw_set("device", "s3cret")
    c.tls_set(ca_certs=str(certs["ca"]))
    import threading
    ev, subscribed = threading.Event(), threading.Event()
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe("edgeml/watch-01/out/#", 1)
    c.on_subscribe = lambda *a: subscribed.set()

    def on_message(cl, u, m):
        got.append(m)
        ev.set()
    c.on_message = on_message
    c.connect("127.0.0.1", b.port)
    c.loop_start()
    try:
        assert subscribed.wait(10)
        series = load_basicmotions("TEST").X[0]
        for _i, row in enumerate(series):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
            c.publish("sensors/w1/imu", json.dumps(body).encode(), qos=1).wait_for_publish(10)
        assert ev.wait(30)
    finally:
        c.loop_stop()
        c.disconnect()
    import msgpack
    assert msgpack.unpackb(got[0].payload)["version"] == "1"
    assert d.status()["mqtt"]["connected"]


def test_wrong_password_is_a_clear_error(secure_broker, tmp_path, activity_bundle):
    b, certs = secure_broker
    cfg = write_config(tmp_path / "edgeml.toml", broker=b, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    text = cfg.read_text().replace(
        f'url = "{b.url}"', f'url = "mqtts://127.0.0.1:{b.port}"\nusername = "device"\n'
        f'password = "wrong"\nca_file = "{certs["ca"]}"')
    cfg.write_text(text)
    import asyncio

    from edgeml.core.device import Device

    async def main():
        await Device(load_config(cfg)).run()
    with pytest.raises(TransportError, match=r"refused|cannot connect"):
        asyncio.run(main())


def test_host_verbs_take_credentials(secure_broker, tmp_path, daemon_factory, activity_bundle,
                                     capsys):
    from edgeml.cli import main

    b, certs = secure_broker
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = write_config(tmp_path / "edgeml.toml", broker=b, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}],
                       extra="[sync]\nenabled = false")
    cfg.write_text(cfg.read_text().replace(
        f'url = "{b.url}"', f'url = "mqtts://127.0.0.1:{b.port}"\nusername = "device"\n'
        f'password_file = "{tmp_path / "pw"}"\nca_file = "{certs["ca"]}"'))
    daemon_factory(cfg)
    url = f"mqtts://127.0.0.1:{b.port}"
    ok = ["status", "--once", "--json", "--broker", url, "--username", "device",
          "--password-file", str(tmp_path / "pw"), "--ca-file", str(certs["ca"])]
    assert main(ok) == 0
    assert json.loads(capsys.readouterr().out)["watch-01"]["online"]
    (tmp_path / "bad").write_text("wrong\n")
    bad = [*ok[:-4], "--password-file", str(tmp_path / "bad"), "--ca-file", str(certs["ca"])]
    assert main(bad) == 1
    assert "refused" in capsys.readouterr().err


def test_mqtt5_persistent_session_keeps_queued_messages(broker):
    """MQTT 5 ends a session at disconnect unless an expiry is asked for; we ask for one."""
    import asyncio

    from conftest import publish_all

    from edgeml.transport.mqtt import MqttTransport
    from edgeml.transport.settings import BrokerSettings

    settings = BrokerSettings(url=broker.url, client_id="v5-device", protocol="5")

    async def subscribe_then_leave():
        async with MqttTransport(settings) as c:
            await c.subscribe([("v5/#", 1)])

    async def come_back():
        async with MqttTransport(settings) as c:
            await c.subscribe([("v5/#", 1)])
            async for m in c.messages():
                return m

    asyncio.run(subscribe_then_leave())
    publish_all(broker, [("v5/queued", b"while away")])
    got = asyncio.run(asyncio.wait_for(come_back(), 10))
    assert (got.topic, got.payload) == ("v5/queued", b"while away")
