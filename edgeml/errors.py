"""The one exception tree of edgeml.

Every error a user can meet derives from :class:`EdgemlError` and carries a ``kind``: a short,
stable, machine-readable code (``signature``, ``self-test``, ``publish_timeout``, ...) that
replies, dead letters and status reports use, so nothing has to parse a message to learn what
went wrong. Library exceptions (zipfile, onnxruntime, paho, sqlite3, cryptography) are
translated at the module boundary with ``raise ... from exc`` so callers only ever catch these.
"""

from __future__ import annotations

from typing import ClassVar


class EdgemlError(Exception):
    """Base of every error edgeml raises on purpose."""

    kind: ClassVar[str] = "error"

    def describe(self) -> str:
        """``kind: message``, the form replies and status reports show."""
        return f"{self.kind}: {self}"


# --- configuration --------------------------------------------------------------------------
class ConfigError(EdgemlError):
    """A config or profile file is wrong. The message names the key and the file."""

    kind = "config"

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.key = key
        self.file = file
        where = f"{file}: " if file else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")


class ProfileError(ConfigError):
    """A firmware profile is missing or invalid."""

    kind = "profile"


class KeyFileError(ConfigError):
    """A key file is missing, unreadable, of the wrong kind, or would be overwritten."""

    kind = "key_file"


# --- bundles and the model store ------------------------------------------------------------
class BundleError(EdgemlError):
    """A bundle cannot be trusted or read. Subclasses say why."""

    kind = "bundle"

    def describe(self) -> str:
        return f"{self.kind}: {self}" if type(self) is not BundleError else str(self)


class BundleFormatError(BundleError):
    """Not a valid bundle: bad zip, truncated, missing/extra/oversized member, path traversal,
    unknown manifest version, or a manifest field of the wrong type."""

    kind = "format"


class BundleIntegrityError(BundleError):
    """The model bytes do not match the sha256 recorded in the manifest."""

    kind = "integrity"


class BundleSignatureError(BundleError):
    """Unsigned while keys are required, signed by an untrusted key, or a bad signature."""

    kind = "signature"


class SelfTestError(BundleError):
    """The model does not reproduce the expected outputs recorded in its manifest."""

    kind = "self-test"


class StoreError(EdgemlError):
    """The on-device model store cannot install, find or remove a model."""

    kind = "store"


# --- host-side conversion -------------------------------------------------------------------
class ConversionError(EdgemlError):
    """A scikit-learn model cannot be turned into a bundle."""

    kind = "conversion"


class UnsupportedEstimatorError(ConversionError):
    """The estimator type is not supported; the message lists the supported ones."""

    kind = "unsupported_estimator"


class ParityError(ConversionError):
    """ONNX output differs from scikit-learn's beyond tolerance; the message says by how much."""

    kind = "parity"


# --- the data path --------------------------------------------------------------------------
class DecodeError(EdgemlError):
    """An input message is rejected; ``reason`` is the dead letter's code (``bad_json``,
    ``missing_feature``, ...)."""

    kind = "decode"

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

    def describe(self) -> str:
        return str(self)


class ModelError(EdgemlError):
    """A model version failed to load or to score."""

    kind = "model"


class RawLogError(EdgemlError):
    """The raw-input archive cannot be opened, written or read."""

    kind = "rawlog"


class RawLogBusyError(RawLogError):
    """Another RawLog (usually the running daemon) holds the directory's writer lock."""

    kind = "rawlog_busy"


class OutboxError(EdgemlError):
    """The durable outbox cannot store or hand out records."""

    kind = "outbox"


# --- the transport --------------------------------------------------------------------------
class TransportError(EdgemlError):
    """The MQTT broker cannot be reached or refused us (bad credentials, TLS failure)."""

    kind = "transport"


class NotConnectedError(TransportError):
    """The operation needs a live connection and there is none right now."""

    kind = "not_connected"


class PublishError(TransportError):
    """The client refused a publish (queue full, payload too large, bad topic)."""

    kind = "publish"


class PublishTimeoutError(TransportError):
    """No acknowledgement from the broker within the time given."""

    kind = "publish_timeout"


class SubscribeError(TransportError):
    """The broker refused or never acknowledged a subscription."""

    kind = "subscribe"


# --- model delivery and commands ------------------------------------------------------------
class DeployError(EdgemlError):
    """A model deployment failed at one stage; ``stage`` names it."""

    kind = "deploy"

    def __init__(self, stage: str, message: str):
        self.stage = stage
        self.detail = message
        super().__init__(f"{stage}: {message}")

    def describe(self) -> str:
        """The cause's kind when a bundle check failed (``signature: ...``), else the detail:
        the stage is reported beside it."""
        cause = self.__cause__
        if isinstance(cause, BundleError):
            return cause.describe()
        return self.detail


class CommandError(EdgemlError):
    """A device command (promote, rollback, retire, set_policy) cannot be carried out."""

    kind = "command"


# --- host tools -----------------------------------------------------------------------------
class FleetTimeout(EdgemlError):
    """No (complete) answer from the device(s) before the timeout."""

    kind = "timeout"


class ReplayError(EdgemlError):
    """A replay cannot run (bad arguments, unreadable archive or bundle)."""

    kind = "replay"


class SnapshotMismatchError(ReplayError):
    """The archive snapshot changed since its manifest was written."""

    kind = "snapshot_mismatch"


class ChartUnavailableError(ReplayError):
    """A chart was asked for and matplotlib is not installed."""

    kind = "chart_unavailable"


class DemoError(EdgemlError):
    """The demo cannot run on this machine."""

    kind = "demo"


class BenchError(EdgemlError):
    """A benchmark cannot run or its target failed."""

    kind = "bench"


# --- the fleet side -------------------------------------------------------------------------
class CollectError(EdgemlError):
    """The collector or the fleet database cannot do what was asked."""

    kind = "collect"


class SinkUnavailableError(CollectError):
    """The fleet database cannot be reached right now (restarting, network, locked): the
    collector retries the same deliveries and acknowledges nothing meanwhile."""

    kind = "sink_unavailable"


class RolloutError(EdgemlError):
    """A staged rollout cannot start or go on: bad waves, hold or thresholds, a database it
    cannot use, or no device to roll out to."""

    kind = "rollout"
