"""MQTT topics of the public contract: parsing device topics and building command topics."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["meter", "vehicle", "pump"]
# \Z, not $: Python's $ also matches before a trailing newline, and "abc\n" is no device id
DEVICE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
PREFIX_TO_KIND: dict[str, Kind] = {"meters": "meter", "vehicles": "vehicle", "pumps": "pump"}
KIND_TO_PREFIX: dict[Kind, str] = {v: k for k, v in PREFIX_TO_KIND.items()}

# What each kind may publish; anything else under a device prefix is an unknown topic.
CHANNELS: dict[Kind, frozenset[str]] = {
    "meter": frozenset({"reading", "obis", "online", "cmd/result"}),
    "vehicle": frozenset({"reading", "online", "cmd/result"}),
    "pump": frozenset({"status", "event", "online", "cmd/result"}),
}
# Published by us towards devices: seen because we subscribe to the whole prefix, never stored.
OUTBOUND = frozenset({"cmd"})

SUBSCRIPTIONS = tuple(f"{prefix}/#" for prefix in PREFIX_TO_KIND)


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    kind: Kind
    device_id: str
    channel: str  # reading | obis | status | event | online | cmd/result | cmd


class TopicError(ValueError):
    pass


@functools.lru_cache(maxsize=1 << 16)
def parse(topic: str) -> DeviceTopic:
    """Split `meters/{id}/reading` and the like; raise TopicError naming what is wrong.

    Cached: a fleet publishes on the same few topics per device over and over (a failure is not cached).
    """
    parts = topic.split("/")
    if len(parts) < 3:
        raise TopicError(f"unknown topic {topic!r}")
    kind = PREFIX_TO_KIND.get(parts[0])
    if kind is None:
        raise TopicError(f"unknown topic {topic!r}")
    device_id = parts[1]
    if not DEVICE_ID.match(device_id):
        raise TopicError(f"invalid device id {device_id!r} in topic {topic!r}")
    channel = "/".join(parts[2:])
    if channel not in CHANNELS[kind] and channel not in OUTBOUND:
        raise TopicError(f"unknown topic {topic!r}")
    return DeviceTopic(kind, device_id, channel)


def subscriptions(shared_group: str | None, extra: Sequence[str] = ()) -> list[str]:
    """Our device topics, plus `extra` (the adapters' firmware topics, bridge.adapters)."""
    wanted = [*SUBSCRIPTIONS, *extra]
    if shared_group:
        return [f"$share/{shared_group}/{t}" for t in wanted]
    return wanted


def device_topic(kind: Kind, device_id: str, channel: str) -> str:
    return f"{KIND_TO_PREFIX[kind]}/{device_id}/{channel}"


def alert_topic(device_id: str) -> str:
    return f"alerts/{device_id}"
