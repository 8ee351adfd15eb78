"""compose.yaml and the container image: what can be checked without a Docker engine."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_parses_and_has_the_production_services() -> None:
    """compose.yaml is valid YAML with TimescaleDB, Mosquitto, migrations, bridge and API."""
    services = compose()["services"]
    assert {"timescaledb", "mosquitto", "migrate", "bridge", "api"} <= set(services)
    assert "timescale/timescaledb" in services["timescaledb"]["image"]
    assert "-oss" not in services["timescaledb"]["image"]  # the Apache-only build lacks continuous aggregates
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["bridge"]["environment"]["BRIDGE_SHARED_GROUP"] == "bridge"


def test_every_mounted_file_exists() -> None:
    """Each bind mount in compose.yaml points at a file or folder of this repository."""
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert (ROOT / "Dockerfile").exists()


def test_services_wait_for_their_dependencies() -> None:
    """The bridge and API start after the migrations completed and the broker is healthy."""
    services = compose()["services"]
    for name in ("bridge", "api"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["mosquitto"]["condition"] == "service_healthy"
    assert "healthcheck" in services["timescaledb"] and "healthcheck" in services["mosquitto"]


def test_broker_acl_limits_devices_to_their_own_topics() -> None:
    """The ACL gives devices pattern rules on their own id only, never a wildcard write."""
    acl = (ROOT / "deploy/mosquitto/acl").read_text().splitlines()
    device_rules = [line for line in acl if line.startswith("pattern ")]
    assert device_rules and all("%u" in line for line in device_rules)
    assert not any(line.startswith("pattern write") and "#" in line for line in acl)


def test_image_commands_are_the_commands_the_tests_run() -> None:
    """The image's default command and compose's commands are `python -m api|bridge` and `alembic upgrade head`."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "api"]' in dockerfile
    assert "USER telemetry" in dockerfile and "HEALTHCHECK" in dockerfile
    commands = {name: s.get("command") for name, s in compose()["services"].items() if "build" in s}
    assert commands.pop("simulator")[0] == "firmware-sim"
    assert compose()["services"]["simulator"]["profiles"] == ["simulator"]
    assert commands == {
        "migrate": ["alembic", "upgrade", "head"],
        "bridge": ["python", "-m", "bridge"],
        "api": ["python", "-m", "api"],
    }


def test_python_m_api_serves_health(apache_url: str, mqtt_url: str) -> None:
    """`python -m api` (the image's command) starts with the environment alone and answers /api/health."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": apache_url, "MQTT_URL": mqtt_url, "API_PORT": str(port), "API_TOKENS": "x"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "api"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    body = r.read()
                break
            except OSError:
                assert proc.poll() is None, "python -m api exited"
                assert time.monotonic() < deadline, "python -m api did not answer /api/health"
                time.sleep(0.2)
        assert b'"status":"ok"' in body
    finally:
        proc.terminate()
        proc.wait(15)
