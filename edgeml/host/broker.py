"""A private mosquitto process on a free loopback port.

Used by the test fixtures, ``edgeml demo`` and ``edgeml bench``: they need a broker they can
configure, stop and restart on the same port, and they must kill only the process they started.
Never binds anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from edgeml.errors import TransportError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_path() -> str | None:
    """``$EDGEML_MOSQUITTO``, else ``mosquitto`` on PATH (it lives in /usr/sbin on Debian)."""
    return os.environ.get("EDGEML_MOSQUITTO") or shutil.which("mosquitto")


class MosquittoBroker:
    """One mosquitto with persistence in ``workdir``; ``start()``/``stop()``/``restart()``.

    ``extra_config`` lines are appended to the generated config (listeners for TLS, password
    files, bridges, ...). ``port`` stays the same across restarts. ``tuned=False`` keeps
    mosquitto's stock queue limits (1000 queued, 20 in flight) and Nagle, as users install it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        listener_config: str | None = None,
        executable: str | None = None,
        tuned: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.listener_config = listener_config
        self.tuned = tuned  # False: mosquitto's own queue, in-flight and Nagle defaults
        self.executable = executable or mosquitto_path()
        if not self.executable:
            raise TransportError("mosquitto is not installed (apt-get install mosquitto)")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            self.listener_config if self.listener_config is not None else "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if self.tuned:  # a test rig's broker: deep queues, no in-flight cap, no Nagle
            lines += ["max_queued_messages 100000", "max_inflight_messages 0",
                      "message_size_limit 0", "set_tcp_nodelay true"]
        if os.geteuid() == 0:
            # As root mosquitto drops to the mosquitto user and then silently cannot write
            # persistence into a root-owned temp dir (queued and retained messages vanish).
            lines.append("user root")
        if self.extra_config:
            lines.append(self.extra_config)
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        if self.process and self.process.poll() is None:
            return self
        self._write_config()
        self.process = subprocess.Popen(
            [self.executable, "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise TransportError(f"mosquitto exited at start: {err.strip()} {log[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TransportError(f"mosquitto did not accept connections on port {self.port}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, so mosquitto writes its persistence file; SIGKILL if it hangs."""
        proc, self.process = self.process, None
        if not proc or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        proc, self.process = self.process, None
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return bool(self.process and self.process.poll() is None)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
