"""The bridge's error hierarchy: library errors are converted here, at the boundary, with context."""

from __future__ import annotations


class TelemetryError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(TelemetryError):
    """A setting is missing or malformed; the message names the variable."""


class PayloadError(TelemetryError):
    """A device message cannot be stored; `reason` is what goes to the dead-letter store."""

    def __init__(self, reason: str, *, errors: list[dict[str, object]] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors or []


class DatabaseUnavailable(TelemetryError):
    """The database cannot be reached; the caller retries with backoff."""


class BrokerUnavailable(TelemetryError):
    """The MQTT broker cannot be reached or refused the connection."""
