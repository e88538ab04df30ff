"""Private nats-server processes for tests: one server, or a 3-node cluster, with JetStream and
the MQTT listener on, on free loopback ports.

Each server has its own store directory under the test's tmp dir, binds only 127.0.0.1, and
keeps its ports across ``kill()``/``start()`` (so a restarted node rejoins its cluster with
its JetStream state). Only the processes started here are ever stopped. Readiness is the
monitoring endpoint's ``/healthz`` (JetStream up and, in a cluster, in contact with the
meta leader), not a sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgeml.host.broker import free_port

CLUSTER_NAME = "edgeml-test"


def nats_server_path() -> str | None:
    """``$EDGEML_NATS_SERVER``, else ``nats-server`` on PATH or in /usr/sbin."""
    return (os.environ.get("EDGEML_NATS_SERVER") or shutil.which("nats-server")
            or (p if os.access(p := "/usr/sbin/nats-server", os.X_OK) else None))


class NatsServer:
    """One nats-server: ``start()``, ``kill()`` (SIGKILL), ``stop()`` (clean), ports kept.

    ``url`` is the NATS client URL, ``mqtt_url`` the MQTT 3.1.1 listener's."""

    def __init__(self, workdir: Path, *, name: str = "n1", routes: list[int] | None = None,
                 cluster_port: int | None = None, mqtt_replicas: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.host = "127.0.0.1"
        self.port = free_port()
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.mqtt_replicas = mqtt_replicas
        self.store_dir = self.workdir / "jetstream"
        self.conf_path = self.workdir / "nats.conf"
        self.log_path = self.workdir / "nats.log"
        self.process: subprocess.Popen[bytes] | None = None
        exe = nats_server_path()
        if exe is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.executable = exe

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.host}:{self.mqtt_port}"

    def _config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.http_port}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 2GB",
            "}",
            "mqtt {",
            f"  listen: {self.host}:{self.mqtt_port}",
        ]
        if self.mqtt_replicas is not None:
            lines.append(f"  stream_replicas: {self.mqtt_replicas}")
        lines.append("}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://{self.host}:{p}" for p in self.routes)
            lines += [
                "cluster {",
                f'  name: "{CLUSTER_NAME}"',
                f"  listen: {self.host}:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> NatsServer:
        if self.running:
            return self
        self.conf_path.write_text(self._config())
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [self.executable, "-c", str(self.conf_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> tuple[bool, str]:
        """``/healthz?js-server-only=true``: (ok, detail). OK means this server's JetStream
        is up and in contact with the meta leader (a restarted node's per-stream catch-up is
        not waited for: the MQTT layer's own single-replica consumers may never catch up)."""
        try:
            with urllib.request.urlopen(
                    f"http://{self.host}:{self.http_port}/healthz?js-server-only=true",
                    timeout=2) as r:
                return r.status == 200, r.read().decode()
        except urllib.error.HTTPError as exc:
            return False, exc.read().decode(errors="replace")
        except OSError as exc:
            return False, str(exc)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited "
                                   f"({self.process.returncode}); see {self.log_path}:\n"
                                   + self.log_tail())
            ok, detail = self.health()
            if ok:
                return
            time.sleep(0.05)
        raise TimeoutError(f"nats-server {self.name} not healthy in {timeout:g} s: {detail}\n"
                           + self.log_tail())

    def jsz(self) -> dict:
        """The monitoring endpoint's JetStream view of this server."""
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/jsz?streams=1",
                                    timeout=2) as r:
            return json.loads(r.read())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or handed over."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """A clean shutdown (SIGTERM); SIGKILL if it does not exit in time."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


class NatsCluster:
    """Three nats-servers routed to each other on 127.0.0.1, JetStream and MQTT on each.

    ``nodes[i].kill()`` / ``nodes[i].start()`` take one node down and back; the MQTT layer's
    own streams keep 3 replicas so it survives the loss of one node."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(Path(workdir) / f"n{i + 1}", name=f"n{i + 1}",
                       cluster_port=cluster_ports[i],
                       routes=[p for j, p in enumerate(cluster_ports) if j != i],
                       mqtt_replicas=min(3, size))
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for n in self.nodes:
            n.start(wait=False)
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.wait_healthy(max(1.0, deadline - time.monotonic()))
        self.wait_meta_leader(max(1.0, deadline - time.monotonic()))
        return self

    def wait_meta_leader(self, timeout: float = 30.0) -> str:
        """Block until the JetStream meta group has a leader every live node agrees on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = set()
            for n in self.nodes:
                if not n.running:
                    continue
                try:
                    meta = n.jsz().get("meta_cluster") or {}
                except OSError:
                    leaders.add(None)
                    continue
                leaders.add(meta.get("leader"))
            if len(leaders) == 1 and None not in leaders and "" not in leaders:
                return leaders.pop()
            time.sleep(0.05)
        raise TimeoutError("the JetStream meta group has no leader")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
