"""The one exception tree of edgeml.

Every error a user can meet derives from :class:`EdgemlError`. Library exceptions
(zipfile, onnxruntime, paho, sqlite3, cryptography) are translated at the module
boundary with ``raise ... from exc`` so callers only ever catch these.
"""

from __future__ import annotations


class EdgemlError(Exception):
    """Base of every error edgeml raises on purpose."""


# --- configuration --------------------------------------------------------------------------
class ConfigError(EdgemlError):
    """A config or profile file is wrong. The message names the key and the file."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.key = key
        self.file = file
        where = f"{file}: " if file else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")


class ProfileError(ConfigError):
    """A firmware profile is missing or invalid."""


# --- bundles and the model store ------------------------------------------------------------
class BundleError(EdgemlError):
    """A bundle cannot be trusted or read. Subclasses say why."""


class BundleFormatError(BundleError):
    """Not a valid bundle: bad zip, truncated, missing/extra/oversized member, path traversal,
    unknown manifest version, or a manifest field of the wrong type."""


class BundleIntegrityError(BundleError):
    """The model bytes do not match the sha256 recorded in the manifest."""


class BundleSignatureError(BundleError):
    """Unsigned while keys are required, signed by an untrusted key, or a bad signature."""


class SelfTestError(BundleError):
    """The model does not reproduce the expected outputs recorded in its manifest."""


class StoreError(EdgemlError):
    """The on-device model store cannot install, find or remove a model."""


# --- host-side conversion -------------------------------------------------------------------
class ConversionError(EdgemlError):
    """A scikit-learn model cannot be turned into a bundle."""


class UnsupportedEstimatorError(ConversionError):
    """The estimator type is not supported; the message lists the supported ones."""


class ParityError(ConversionError):
    """ONNX output differs from scikit-learn's beyond tolerance; the message says by how much."""


# --- the data path --------------------------------------------------------------------------
class DecodeError(EdgemlError):
    """An input message is rejected; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ModelError(EdgemlError):
    """A model version failed to load or to score."""


class RawLogError(EdgemlError):
    """The raw-input archive cannot be opened, written or read."""


class OutboxError(EdgemlError):
    """The durable outbox cannot store or hand out records."""


class TransportError(EdgemlError):
    """The MQTT broker cannot be reached or refused us (bad credentials, TLS failure)."""


class DeployError(EdgemlError):
    """A model deployment failed at one stage; ``stage`` names it."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"{stage}: {message}")


class CommandError(EdgemlError):
    """A device command (promote, rollback, retire, set_policy) cannot be carried out."""
