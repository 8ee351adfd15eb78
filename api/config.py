"""API settings: the bridge's settings plus what only the API needs; built once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge.config import Settings, _float, _int, environment, legacy
from bridge.errors import ConfigError


def _bool(env: Mapping[str, str], name: str) -> bool:
    value = (env.get(name) or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class ApiSettings:
    core: Settings = field(default_factory=Settings)
    tokens: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    db_pool_max: int = 10
    command_timeout: float = 60.0
    read_obis_wait: float = 10.0
    ws_queue: int = 256
    # a pump `on` command is refused below this ground-tank level (dry-run protection) unless forced
    pump_dry_run_percent: float = 10.0
    mqtt_client_id: str = "telemetry-api"
    cors_origins: tuple[str, ...] = ()
    # one log line per request costs ~10 % of a small request's time; a proxy in front usually logs them
    access_log: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        env = legacy(environment() if env is None else env)
        tokens = tuple(t.strip() for t in (env.get("API_TOKENS") or "").split(",") if t.strip())
        port = _int(env, "API_PORT", 8000, 0)
        if port > 65535:
            raise ConfigError(f"API_PORT: must be <= 65535, got {port}")
        return cls(
            core=Settings.from_env(env),
            tokens=tokens,
            host=env.get("API_HOST") or "127.0.0.1",
            port=port,
            db_pool_max=_int(env, "API_DB_POOL_MAX", 10, 1),
            command_timeout=_float(env, "COMMAND_TIMEOUT", 60.0, 1.0),
            read_obis_wait=_float(env, "READ_OBIS_WAIT", 10.0, 0.0),
            ws_queue=_int(env, "WS_QUEUE", 256, 1),
            pump_dry_run_percent=_float(env, "PUMP_DRY_RUN_PERCENT", 10.0, 0.0),
            mqtt_client_id=env.get("API_CLIENT_ID") or f"telemetry-api-{os.getpid()}",
            # EMS's name for the browser origins allowed to call the API
            cors_origins=tuple(o.strip() for o in (env.get("ALLOWED_ORIGINS") or "").split(",") if o.strip()),
            access_log=_bool(env, "API_ACCESS_LOG"),
        )
