"""Synced batches from any MQTT broker: a persistent session, QoS 1, acknowledged after commit.

The source subscribes ``{p}/+/sync/#`` (or ``$share/<group>/{p}/+/sync/#`` with a group, so
several collectors split the work) at QoS 1 with a stable client id and ``clean_session``
false: while the collector is down the broker queues what devices sync, and anything
delivered but not acknowledged is delivered again on the next connection. PUBACKs are sent
only when the collector calls the delivery's ``ack`` (after its transaction committed), using
:class:`~edgeml.transport.mqtt.MqttTransport`'s manual acknowledgements.

How many batches are in flight is the broker's choice (mosquitto: ``max_inflight_messages``,
20 by default; MQTT 5: our Receive Maximum); the collector's batch of deliveries per commit is
at most that many messages.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

from edgeml.host.collect.source import Delivery
from edgeml.transport.base import Message
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings


def default_client_id(group: str | None) -> str:
    """Stable across restarts on one host (the persistent session depends on it)."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"edgeml-collect-{group or 'all'}-{host}"


class MqttSource:
    """``async with MqttSource(url, ...) as src: async for d in src.deliveries(): ...``"""

    def __init__(self, url: str, *, prefix: str = "edgeml", group: str | None = None,
                 client_id: str | None = None, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None,
                 protocol: str = "3.1.1", receive_maximum: int | None = None,
                 max_batch: int = 1024) -> None:
        if group is not None and (not group or any(c in group for c in "/+#")):
            from edgeml.errors import ConfigError

            raise ConfigError(f"a share group name cannot be empty or hold / + #: {group!r}",
                              key="--group")
        self.url = url
        self.name = url
        self.prefix = prefix
        self.group = group
        self.max_batch = max_batch
        self.filter = f"{prefix}/+/sync/#"
        if group:
            self.filter = f"$share/{group}/{self.filter}"
        self.settings = BrokerSettings(
            url=url, client_id=client_id or default_client_id(group), clean_start=False,
            username=username, password=password, ca_file=ca_file, protocol=protocol,
            receive_maximum=receive_maximum, max_inflight=100)
        self.transport = MqttTransport(self.settings, manual_ack=True)
        self.received = 0

    async def __aenter__(self) -> MqttSource:
        await self.transport.__aenter__()
        try:
            await self.transport.subscribe([(self.filter, 1)])
        except BaseException:
            await self.transport.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    @property
    def connected(self) -> bool:
        return self.transport.connected

    def stats(self) -> dict:
        return {"source": self.name, "filter": self.filter, "connected": self.connected,
                "received": self.received, **self.transport.stats()}

    def _delivery(self, msg: Message) -> Delivery:
        transport = self.transport

        async def ack() -> None:
            transport.ack(msg)

        return Delivery(msg.topic, msg.payload, ack, self.name)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        async for burst in self.transport.batches(self.max_batch):
            for msg in burst:
                self.received += 1
                yield self._delivery(msg)
