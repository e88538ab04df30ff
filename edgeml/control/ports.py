"""What control may see of the device: three narrow ports, implemented by the composition
root. Control never reaches into the device, the pipelines' internals or the transport."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from edgeml.config import PipelineConfig
from edgeml.core.model import Member


class Pipelines(Protocol):
    """The pipelines as control sees them: read the active set, swap it, set the policy."""

    def names(self) -> list[str]: ...

    def config(self, name: str) -> PipelineConfig: ...

    def members(self, name: str) -> tuple[Member, ...]: ...

    def champion(self, name: str) -> Member | None: ...

    def policy(self, name: str) -> str: ...

    def set_members(self, name: str, members: Sequence[Member]) -> None: ...

    def set_policy(self, name: str, policy: str) -> None: ...

    def reset_canary(self, name: str) -> None: ...

    def figures(self, name: str, key: tuple[str, str]) -> dict: ...

    def canary(self, name: str) -> dict: ...


class EventSink(Protocol):
    """Where control's reports go: replies and deploy stages on their topics, deployment
    outcomes into the outbox, alerts, and a nudge to publish the status now."""

    def publish(self, topic: str, doc: dict) -> None: ...

    def deploy_event(self, event: dict) -> None: ...

    def alert(self, pipeline: str, kind: str, detail: dict) -> None: ...

    def status_changed(self) -> None: ...
