"""A pure-Python MQTT broker (amqtt) inside this process: the demo's last resort.

``edgeml demo`` must work on a fresh machine with no mosquitto installed. This wraps amqtt (the
``broker`` extra) behind the same small surface as :class:`edgeml.host.broker.MosquittoBroker`
(``start``/``stop``/``url``), on 127.0.0.1 and a free port, in a background thread with its own
event loop so that it keeps serving while the caller's loop (or a blocking caller) is busy.

It is for trying edgeml, not for production: MQTT 3.1.1 only, no ``$share/`` subscriptions, no
persistence across restarts, and roughly 1,500 QoS 1 messages/s on one core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from typing import Any

from edgeml.errors import TransportError
from edgeml.host.broker import free_port

log = logging.getLogger("edgeml.host.embedded_broker")

INSTALL_HINT = "pip install 'edgeml[broker]' (or: pip install amqtt)"


def embedded_available() -> bool:
    """Is amqtt importable? (Checked without starting anything.)"""
    import importlib.util

    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.url``; or ``start()``/``stop()``.

    Anonymous clients are allowed; it listens on ``127.0.0.1`` only.
    """

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise TransportError(f"the embedded broker listens on loopback only, not {host!r}")
        self.host = host
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive() and self._broker is not None)

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # only what a demo needs: no $SYS publisher, no packet logging
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start serving; returns once the port accepts connections."""
        if self.running:
            return self
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise TransportError(f"no MQTT broker available: amqtt is not installed "
                                 f"({INSTALL_HINT})") from exc
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def boot() -> None:
            self._broker = Broker(self._config())
            await self._broker.start()

        def target() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # reported to start() below
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            try:
                loop.run_forever()
            finally:
                _cancel_all(loop)
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=target, name="edgeml-embedded-broker",
                                        daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            self.stop()
            raise TransportError(f"the embedded broker did not start on port {self.port} "
                                 f"within {timeout:g} s") from exc
        except Exception as exc:  # amqtt's BrokerError, OSError (port taken), ...
            self._broker = None
            self._thread.join(timeout)
            raise TransportError(f"the embedded broker cannot listen on {self.url}: "
                                 f"{exc}") from exc
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, close the listener and end the thread."""
        loop, thread, broker = self._loop, self._thread, self._broker
        self._broker = None
        if loop is None or thread is None or not thread.is_alive():
            return
        if broker is not None:
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the embedded broker thread did not end within %g s", timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())
