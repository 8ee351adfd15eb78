"""Configuration from the environment and `.env`, including the old systems' variable names."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.config import ApiSettings
from bridge.config import Settings, environment
from bridge.errors import ConfigError


def test_defaults_follow_the_contract() -> None:
    """No variables: UTC, peak 14:00-22:00, API on 127.0.0.1:8000."""
    s = ApiSettings.from_env({})
    assert (s.core.site_timezone.key, str(s.core.peak_window), s.host, s.port) == (
        "UTC",
        "14:00-22:00",
        "127.0.0.1",
        8000,
    )


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENV_FILE (or ./.env) supplies values; a variable set in the environment overrides it."""
    env_file = tmp_path / ".env"
    env_file.write_text('# comment\nexport SITE_TIMEZONE="Europe/Berlin"\nPEAK_WINDOW=17:00-21:00\nAPI_PORT=9000\n')
    monkeypatch.setenv("ENV_FILE", str(env_file))
    monkeypatch.setenv("API_PORT", "9100")
    env = environment()
    assert env["SITE_TIMEZONE"] == "Europe/Berlin"
    s = ApiSettings.from_env(env)
    assert (s.core.site_timezone.key, str(s.core.peak_window), s.port) == ("Europe/Berlin", "17:00-21:00", 9100)


def test_old_variable_names_are_accepted() -> None:
    """PORT, POSTGRES_* and METER_POLLING_INTERVAL (ms) mean what they meant in PUMP and HES."""
    s = ApiSettings.from_env(
        {
            "PORT": "3000",
            "POSTGRES_HOST": "db",
            "POSTGRES_PORT": "5433",
            "POSTGRES_USER": "pump",
            "POSTGRES_PASSWORD": "p@ss word",
            "POSTGRES_DB": "waterpump",
            "METER_POLLING_INTERVAL": "900000",
        }
    )
    assert s.port == 3000
    assert s.core.database_url == "postgresql://pump:p%40ss%20word@db:5433/waterpump"
    assert s.core.expected_interval == 900.0 and s.core.offline_after == 2700.0


def test_our_names_win_over_old_ones() -> None:
    """DATABASE_URL and API_PORT take precedence over POSTGRES_* and PORT."""
    s = ApiSettings.from_env(
        {"PORT": "3000", "API_PORT": "8100", "POSTGRES_HOST": "db", "DATABASE_URL": "postgresql://x@y/z"}
    )
    assert (s.port, s.core.database_url) == (8100, "postgresql://x@y/z")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SITE_TIMEZONE": "Mars/Olympus"}, "SITE_TIMEZONE"),
        ({"PEAK_WINDOW": "2pm-10pm"}, "PEAK_WINDOW"),
        ({"MQTT_URL": "http://broker"}, "MQTT_URL"),
        ({"API_PORT": "eighty"}, "API_PORT"),
        ({"BRIDGE_BATCH_SIZE": "0"}, "BRIDGE_BATCH_SIZE"),
        ({"POSTGRES_HOST": "db", "POSTGRES_PORT": "x"}, "POSTGRES_PORT"),
        ({"METER_POLLING_INTERVAL": "soon"}, "METER_POLLING_INTERVAL"),
        ({"MQTT_URL": "mqtts://b:8883", "MQTT_CA_FILE": "/nonexistent/ca.pem"}, "MQTT_CA_FILE"),
        ({"BRIDGE_HEALTH": "nowhere"}, "BRIDGE_HEALTH"),
        ({"BRIDGE_PARTITION": "2/2"}, "BRIDGE_PARTITION"),
        ({"BRIDGE_PARTITION": "0/2", "BRIDGE_SHARED_GROUP": "g"}, "BRIDGE_PARTITION"),
        ({"API_ACCESS_LOG": "maybe"}, "API_ACCESS_LOG"),
        ({"BRIDGE_ROLLUP_EVERY_S": "-1"}, "BRIDGE_ROLLUP_EVERY_S"),
    ],
)
def test_malformed_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    """A malformed value fails with an error that names its variable."""
    with pytest.raises(ConfigError, match=variable):
        ApiSettings.from_env(env)


def test_partition_names_its_own_session() -> None:
    """BRIDGE_PARTITION i/N: the bridge's client id gets an `-iofN` suffix, so each partition keeps its session."""
    s = Settings.from_env({"BRIDGE_PARTITION": "1/3", "BRIDGE_CLIENT_ID": "br"})
    assert (s.partition, s.client_id) == ((1, 3), "br-1of3")
    assert Settings.from_env({"BRIDGE_PARTITION": "0/1"}).partition is None


def test_example_env_documents_every_variable() -> None:
    """.env.example mentions every variable the settings read."""
    text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    for name in (
        "DATABASE_URL",
        "MQTT_URL",
        "API_TOKENS",
        "SITE_TIMEZONE",
        "PEAK_WINDOW",
        "API_HOST",
        "API_PORT",
        "BRIDGE_CLIENT_ID",
        "BRIDGE_SHARED_GROUP",
        "BRIDGE_BATCH_SIZE",
        "BRIDGE_FLUSH_MS",
        "BRIDGE_RECEIVE_MAXIMUM",
        "BRIDGE_HEALTH",
        "BRIDGE_WRITERS",
        "BRIDGE_ROLLUP_EVERY_S",
        "BRIDGE_PARTITION",
        "API_ACCESS_LOG",
        "MQTT_PROTOCOL",
        "MQTT_CA_FILE",
        "MQTT_CERT_FILE",
        "MQTT_KEY_FILE",
        "DEVICE_OFFLINE_AFTER",
        "EXPECTED_INTERVAL",
        "MAX_FUTURE_SKEW",
        "SCHEMA_LEVEL",
        "COMPRESS_AFTER",
        "RAW_RETENTION",
        "COMMAND_TIMEOUT",
        "READ_OBIS_WAIT",
        "PUMP_DRY_RUN_PERCENT",
        "PORT",
        "POSTGRES_HOST",
        "METER_POLLING_INTERVAL",
        "ENV_FILE",
    ):
        assert name in text, name
    assert Settings.from_env({}).database_url  # and the defaults still build
