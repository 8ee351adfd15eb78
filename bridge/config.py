"""Settings: one frozen dataclass built once from the environment and passed down."""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

from .adapters import DEFAULT_RPC_SRC, Spec, parse_specs
from .errors import ConfigError

DEFAULT_DATABASE_URL = "postgresql://postgres:postgres@127.0.0.1:5432/telemetry"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # trust this CA (a self-signed broker) instead of the system's
    cert_file: str | None = None  # client certificate, for brokers that require one
    key_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def with_tls_files(self, env: Mapping[str, str]) -> MqttUrl:
        """MQTT_CA_FILE, MQTT_CERT_FILE and MQTT_KEY_FILE; each must name a readable file."""
        files: dict[str, Any] = {}
        for name, attr in (("MQTT_CA_FILE", "ca_file"), ("MQTT_CERT_FILE", "cert_file"), ("MQTT_KEY_FILE", "key_file")):
            path = env.get(name)
            if path:
                if not os.path.isfile(path):
                    raise ConfigError(f"{name}: no such file {path!r}")
                files[attr] = path
        if files and not self.tls:
            raise ConfigError("MQTT_CA_FILE/MQTT_CERT_FILE/MQTT_KEY_FILE need an mqtts:// MQTT_URL")
        return replace(self, **files) if files else self

    @classmethod
    def parse(cls, url: str, *, variable: str = "MQTT_URL") -> MqttUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"{variable}: scheme must be mqtt:// or mqtts://, got {url!r}")
        if not parts.hostname:
            raise ConfigError(f"{variable}: no host in {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"{variable}: bad port in {url!r}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


@dataclass(frozen=True)
class PeakWindow:
    start: time
    end: time

    @classmethod
    def parse(cls, text: str, *, variable: str = "PEAK_WINDOW") -> PeakWindow:
        m = _WINDOW.match(text)
        if not m:
            raise ConfigError(f"{variable}: expected HH:MM-HH:MM, got {text!r}")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        try:
            start = time(h1 % 24 if h1 == 24 else h1, m1)
            end = time(0, m2) if h2 == 24 else time(h2, m2)
        except ValueError as exc:
            raise ConfigError(f"{variable}: {exc} in {text!r}") from exc
        return cls(start, end)

    def contains(self, t: time) -> bool:
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # window across midnight

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from exc
    if not value >= minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {raw}")
    return value


def environment(env_file: str | None = None) -> dict[str, str]:
    """The process environment over a `.env` file (ENV_FILE, else ./.env), as the four old systems read it."""
    path = env_file or os.environ.get("ENV_FILE") or ".env"
    values: dict[str, str] = {}
    if os.path.isfile(path):
        values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    elif env_file or os.environ.get("ENV_FILE"):
        raise ConfigError(f"ENV_FILE: no such file {path!r}")
    values.update(os.environ)
    return values


def legacy(env: Mapping[str, str]) -> dict[str, str]:
    """Accept the old systems' variable names where they mean the same as ours (ours win)."""
    out = dict(env)
    if not out.get("DATABASE_URL") and any(out.get(k) for k in ("POSTGRES_HOST", "POSTGRES_DB", "POSTGRES_USER")):
        port = out.get("POSTGRES_PORT") or "5432"
        if not port.isdigit():
            raise ConfigError(f"POSTGRES_PORT: expected a port number, got {port!r}")
        user = quote(out.get("POSTGRES_USER") or "postgres", safe="")
        password = out.get("POSTGRES_PASSWORD")
        auth = f"{user}:{quote(password, safe='')}" if password else user
        host = out.get("POSTGRES_HOST") or "127.0.0.1"
        out["DATABASE_URL"] = f"postgresql://{auth}@{host}:{port}/{quote(out.get('POSTGRES_DB') or 'telemetry')}"
    if not out.get("API_PORT") and out.get("PORT"):
        out["API_PORT"] = out["PORT"]
    raw = out.get("METER_POLLING_INTERVAL")
    if raw and not out.get("EXPECTED_INTERVAL"):
        try:
            interval = float(raw)
        except ValueError as exc:
            raise ConfigError(f"METER_POLLING_INTERVAL: expected a number of seconds, got {raw!r}") from exc
        if interval <= 0:
            raise ConfigError(f"METER_POLLING_INTERVAL: must be > 0, got {raw!r}")
        # HES wrote it in milliseconds (e.g. 900000); nobody polls meters every 3 hours in seconds
        seconds = interval / 1000.0 if interval >= 10000 else interval
        out["EXPECTED_INTERVAL"] = str(seconds)
        out.setdefault("DEVICE_OFFLINE_AFTER", str(3 * seconds))
    return out


def _health(env: Mapping[str, str]) -> tuple[str, int | None]:
    raw = env.get("BRIDGE_HEALTH") or "127.0.0.1:9108"
    if raw == "off":
        return "127.0.0.1", None
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"BRIDGE_HEALTH: expected HOST:PORT or off, got {raw!r}")
    return host or "127.0.0.1", int(port)


def _partition(env: Mapping[str, str]) -> tuple[int, int] | None:
    raw = (env.get("BRIDGE_PARTITION") or "").strip()
    if not raw:
        return None
    index, sep, count = raw.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count) <= 64:
        raise ConfigError(f"BRIDGE_PARTITION: expected I/N with 0 <= I < N <= 64 (e.g. 0/2), got {raw!r}")
    if env.get("BRIDGE_SHARED_GROUP"):
        raise ConfigError("BRIDGE_PARTITION and BRIDGE_SHARED_GROUP exclude each other: use one way to scale out")
    return (int(index), int(count)) if int(count) > 1 else None


def session_id(client_id: str, partition: tuple[int, int] | None) -> str:
    """The MQTT client id a bridge connects with: each partition keeps a session of its own (the broker
    queues each one's messages)."""
    return client_id + (f"-{partition[0]}of{partition[1]}" if partition else "")


def _default_client_id(env: Mapping[str, str]) -> str:
    # replicas on a shared subscription each need their own session: name it after the host
    if env.get("BRIDGE_SHARED_GROUP"):
        return f"telemetry-bridge-{socket.gethostname()}"
    return "telemetry-bridge"


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    mqtt: MqttUrl = field(default_factory=lambda: MqttUrl.parse(DEFAULT_MQTT_URL))
    site_timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    peak_window: PeakWindow = field(default_factory=lambda: PeakWindow(time(14), time(22)))
    # MQTT client identity: a stable id is what makes the broker keep our session across restarts
    client_id: str = "telemetry-bridge"
    shared_group: str | None = None
    # (i, n): this bridge stores the devices that hash to i of n; every bridge of the n receives every
    # message on its own session and just acknowledges the others' (see bridge.mqtt)
    partition: tuple[int, int] | None = None
    mqtt_protocol: str = "auto"  # auto | 5 | 3.1.1
    receive_maximum: int = 10000
    batch_size: int = 4000
    # concurrent writers, each with its own connection and a share of the devices (1 for PGlite)
    writers: int = 2
    # how often the Roller (bridge.rollups) looks for hours to roll up, on one more connection; 0: never
    # (reads stay exact, only slower; PGlite serves one connection)
    rollup_every: float = 60.0
    flush_interval: float = 0.005
    expected_interval: float = 60.0  # how often devices are expected to report (HES polling view)
    offline_after: float = 300.0
    max_future_skew: float = 600.0
    max_payload_bytes: int = 64 * 1024
    schema_level: str = "auto"  # auto | full | apache | plain
    health_host: str = "127.0.0.1"
    health_port: int | None = 9108  # None: no /healthz and /metrics server
    # Tasmota, Shelly and ESPHome devices on their own topics (bridge.adapters, docs/adapters.md)
    adapters: tuple[Spec, ...] = ()
    shelly_rpc_src: str = DEFAULT_RPC_SRC  # our name in Shelly JSON-RPC requests; replies come to <it>/…

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = legacy(environment() if env is None else env)
        tz_name = env.get("SITE_TIMEZONE") or "UTC"
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"SITE_TIMEZONE: unknown IANA zone {tz_name!r}") from exc
        protocol = env.get("MQTT_PROTOCOL") or "auto"
        if protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"MQTT_PROTOCOL: expected auto, 5 or 3.1.1, got {protocol!r}")
        level = env.get("SCHEMA_LEVEL") or "auto"
        if level not in ("auto", "full", "apache", "plain"):
            raise ConfigError(f"SCHEMA_LEVEL: expected auto, full, apache or plain, got {level!r}")
        health_host, health_port = _health(env)
        partition = _partition(env)
        rpc_src = env.get("SHELLY_RPC_SRC") or DEFAULT_RPC_SRC
        if any(not level or "+" in level or "#" in level for level in rpc_src.split("/")):
            raise ConfigError(f"SHELLY_RPC_SRC: expected a topic prefix without wildcards, got {rpc_src!r}")
        return cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            mqtt=MqttUrl.parse(env.get("MQTT_URL") or DEFAULT_MQTT_URL).with_tls_files(env),
            site_timezone=tz,
            peak_window=PeakWindow.parse(env.get("PEAK_WINDOW") or "14:00-22:00"),
            client_id=session_id(env.get("BRIDGE_CLIENT_ID") or _default_client_id(env), partition),
            shared_group=env.get("BRIDGE_SHARED_GROUP") or None,
            partition=partition,
            mqtt_protocol=protocol,
            receive_maximum=_int(env, "BRIDGE_RECEIVE_MAXIMUM", 10000, 1),
            batch_size=_int(env, "BRIDGE_BATCH_SIZE", 4000, 1),
            writers=min(_int(env, "BRIDGE_WRITERS", 2, 1), 16),
            rollup_every=_float(env, "BRIDGE_ROLLUP_EVERY_S", 60.0),
            flush_interval=_float(env, "BRIDGE_FLUSH_MS", 5.0) / 1000.0,
            expected_interval=_float(env, "EXPECTED_INTERVAL", 60.0, 1.0),
            offline_after=_float(env, "DEVICE_OFFLINE_AFTER", 300.0, 1.0),
            max_future_skew=_float(env, "MAX_FUTURE_SKEW", 600.0),
            schema_level=level,
            health_host=health_host,
            health_port=health_port,
            adapters=parse_specs(env.get("ADAPTERS")),
            shelly_rpc_src=rpc_src,
        )
