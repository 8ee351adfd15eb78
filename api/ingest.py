"""HTTP and WebSocket ingestion: validate like the bridge, publish to the device's topic, 202 after PUBACK.

The bridge stays the one writer: the API never inserts readings itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel

from bridge import topics
from bridge.errors import PayloadError
from bridge.telemetry import (
    MeterReadingIn,
    ObisReadingsIn,
    PumpEventIn,
    PumpStatusIn,
    VehicleReadingIn,
    to_datetime,
)

from .config import ApiSettings
from .errors import Invalid
from .mqtt import MqttLink
from .responses import validate

# (kind, channel) -> model and the body fields that may carry the device id
MODELS: dict[tuple[topics.Kind, str], tuple[type[BaseModel], tuple[str, ...]]] = {
    ("meter", "reading"): (MeterReadingIn, ("meterId", "deviceId", "meter_id", "device_id")),
    ("meter", "obis"): (ObisReadingsIn, ("meterId", "deviceId", "meter_id", "device_id")),
    ("vehicle", "reading"): (VehicleReadingIn, ("vehicleId", "deviceId", "vehicle_id", "device_id")),
    ("pump", "status"): (PumpStatusIn, ("device_id", "deviceId")),
    ("pump", "event"): (PumpEventIn, ("device_id", "deviceId")),
}


def device_id_of(body: dict[str, Any], fields: tuple[str, ...], given: str | None = None) -> str:
    found = next((body[f] for f in fields if isinstance(body.get(f), str)), None)
    device_id = given or found
    if device_id is None:
        raise Invalid("the body names no device", details=[{"field": fields[0], "message": "Field required"}])
    if given and found and found != given:
        raise Invalid(
            f"device id {found!r} in the body differs from {given!r} in the path",
            details=[{"field": fields[0], "message": f"differs from {given!r}"}],
        )
    if not topics.DEVICE_ID.match(device_id):
        raise Invalid(
            f"invalid device id {device_id!r}",
            details=[{"field": fields[0], "message": "must match [A-Za-z0-9_.:-]{1,64}"}],
        )
    return device_id


def _obis(body: dict[str, Any]) -> ObisReadingsIn:
    from pydantic import ValidationError

    from bridge.telemetry import explain

    try:
        return ObisReadingsIn.from_payload(body)
    except ValidationError as exc:
        raise Invalid("invalid body", details=explain(exc)) from exc


async def publish(
    settings: ApiSettings,
    mqtt: MqttLink,
    kind: topics.Kind,
    channel: str,
    body: Any,
    device_id: str | None = None,
) -> dict[str, Any]:
    """Validate `body` as the bridge would, publish it at QoS 1, and describe what was accepted."""
    model, fields = MODELS[(kind, channel)]
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object", details=[{"field": "(body)", "message": "not an object"}])
    device = device_id_of(body, fields, device_id)
    parsed = validate(model, body) if model is not ObisReadingsIn else _obis(body)
    stamp = getattr(parsed, "timestamp", None)
    try:
        ts = to_datetime(
            stamp,
            tz=settings.core.site_timezone,
            received_at=datetime.now(UTC),
            max_future=settings.core.max_future_skew,
        )
    except PayloadError as exc:
        raise Invalid(exc.reason, details=[{"field": "timestamp", "message": exc.reason}]) from exc
    topic = topics.device_topic(kind, device, channel)
    await mqtt.publish(topic, orjson.dumps(body), qos=1)
    return {"status": "accepted", "deviceId": device, "kind": kind, "topic": topic, "timestamp": ts.isoformat()}
