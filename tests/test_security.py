"""Security: TLS to broker and database with a self-signed CA, the broker ACL, constant-time tokens."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import MqttUrl

from .conftest import ROOT, migrate, settings_for, unique, wait_for_rows
from .faults.conftest import OwnBroker, OwnPostgres


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = Path(tempfile.mkdtemp(prefix="pki-"))
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=telemetry test CA",
        cwd=d,
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'127.0.0.1' if name == 'server' else 'bridge'}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    for f in d.iterdir():
        f.chmod(0o644)
    (d / "server.key").chmod(0o600)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class TlsBroker(OwnBroker):
    def __init__(self, root: Path, pki: Path) -> None:
        super().__init__(root)
        self.pki = pki
        self.url = f"mqtts://127.0.0.1:{self.port}"

    def init(self) -> None:
        super().init()
        for f in ("ca.pem", "server.pem", "server.key"):
            shutil.copy(self.pki / f, self.root / f)
            os.chmod(self.root / f, 0o644)
        conf = self.conf.read_text().replace(f"listener {self.port} 127.0.0.1\n", "")
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\ncafile {self.root}/ca.pem\ncertfile {self.root}/server.pem\n"
            f"keyfile {self.root}/server.key\nrequire_certificate true\n" + conf
        )


class AclBroker(OwnBroker):
    def __init__(self, root: Path, users: dict[str, str]) -> None:
        super().__init__(root)
        self.users = users

    def init(self) -> None:
        super().init()
        passwd = self.root / "passwd"
        passwd.touch()
        for user, password in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
        os.chmod(passwd, 0o644)
        shutil.copy(ROOT / "deploy/mosquitto/acl", self.root / "acl")
        os.chmod(self.root / "acl", 0o644)
        conf = self.conf.read_text().replace("allow_anonymous true\n", "")
        self.conf.write_text(conf + f"allow_anonymous false\npassword_file {passwd}\nacl_file {self.root}/acl\n")


@pytest.fixture
def tls_broker(pki: Path) -> Iterator[TlsBroker]:
    root = Path(tempfile.mkdtemp(prefix="tls-mqtt-"))
    broker = TlsBroker(root, pki)
    broker.init()
    broker.start()
    yield broker
    broker.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tls_pg(pki: Path, site_env: dict[str, str]) -> Iterator[OwnPostgres]:
    root = Path(tempfile.mkdtemp(prefix="tls-pg-"))
    pg = OwnPostgres(root)
    pg.init()
    for f in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki / f, pg.data / f)
        shutil.chown(pg.data / f, "postgres") if os.geteuid() == 0 else None
    os.chmod(pg.data / "server.key", 0o600)
    with (pg.data / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n")
    # refuse anything but TLS from TCP clients
    (pg.data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
    pg.start()
    with psycopg.connect(pg.url + "?sslmode=require", autocommit=True) as conn:
        conn.execute("CREATE DATABASE telemetry")
    pg.url = f"postgresql://postgres@127.0.0.1:{pg.port}/telemetry?sslmode=verify-full&sslrootcert={pki}/ca.pem"
    migrate(pg.url, "upgrade", "head", env=site_env)
    yield pg
    pg.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def tls_client(url: str, pki: Path, client_cert: bool = True) -> mqtt.Client:
    u = MqttUrl.parse(url)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("dev"))
    client.tls_set(
        ca_certs=str(pki / "ca.pem"),
        certfile=str(pki / "client.pem") if client_cert else None,
        keyfile=str(pki / "client.key") if client_cert else None,
    )
    client.connect(u.host, u.port)
    return client


async def test_bridge_over_tls_to_broker_and_database(
    tls_broker: TlsBroker, tls_pg: OwnPostgres, pki: Path, start_bridge
) -> None:
    """mqtts:// with a client certificate and sslmode=verify-full, both signed by a self-signed CA."""
    mqtt_url = MqttUrl.parse(tls_broker.url).with_tls_files(
        {
            "MQTT_CA_FILE": str(pki / "ca.pem"),
            "MQTT_CERT_FILE": str(pki / "client.pem"),
            "MQTT_KEY_FILE": str(pki / "client.key"),
        }
    )
    settings = replace(settings_for(tls_pg.url, tls_broker.url), mqtt=mqtt_url)
    await start_bridge(settings)
    meter = unique("m")
    device = tls_client(tls_broker.url, pki)
    device.loop_start()
    info = device.publish(f"meters/{meter}/reading", orjson.dumps({"voltage": 231.0}), qos=1)
    info.wait_for_publish(10)
    await wait_for_rows(tls_pg.url, "SELECT voltage FROM meter_readings WHERE meter_id = %s", (meter,), 1)
    with psycopg.connect(tls_pg.url) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    device.disconnect()
    device.loop_stop()


def test_tls_broker_refuses_clients_without_certificate(tls_broker: TlsBroker, pki: Path) -> None:
    """require_certificate: a client without a certificate cannot even connect."""
    with pytest.raises((OSError, mqtt.WebsocketConnectionError)):  # TLS handshake fails
        client = tls_client(tls_broker.url, pki, client_cert=False)
        client.loop_start()
        time.sleep(1)
        assert not client.is_connected()
        raise OSError("not connected")


def test_tls_database_refuses_plain_connections(tls_pg: OwnPostgres) -> None:
    """The database accepts TLS only (hostssl), so sslmode=disable is refused."""
    plain = tls_pg.url.split("?", 1)[0] + "?sslmode=disable"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(plain, connect_timeout=5)


def test_acl_lets_a_device_write_only_its_own_topics(mqtt_url: str) -> None:
    """With compose's ACL, dev1 publishing as dev2 is refused; the bridge user still reads dev1's own data."""
    users = {"bridge": "b-pass", "dev1": "d1-pass", "dev2": "d2-pass"}
    root = Path(tempfile.mkdtemp(prefix="acl-mqtt-"))
    broker = AclBroker(root, users)
    broker.init()
    broker.start()
    try:
        received: list[str] = []
        subscribed = threading.Event()
        bridge = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="acl-bridge", protocol=mqtt.MQTTv5
        )
        bridge.username_pw_set("bridge", "b-pass")
        bridge.on_message = lambda c, u, m: received.append(m.topic)
        bridge.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
        bridge.connect("127.0.0.1", broker.port)
        bridge.loop_start()
        bridge.subscribe("meters/#", qos=1)
        assert subscribed.wait(5)

        acks: dict[int, int] = {}
        dev = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="dev1", protocol=mqtt.MQTTv5)
        dev.username_pw_set("dev1", "d1-pass")
        dev.on_publish = lambda c, u, mid, rc, p: acks.__setitem__(mid, rc.value)
        dev.connect("127.0.0.1", broker.port)
        dev.loop_start()
        own = dev.publish("meters/dev1/reading", b'{"voltage": 230}', qos=1, properties=Properties(PacketTypes.PUBLISH))
        spoof = dev.publish("meters/dev2/reading", b'{"voltage": 1}', qos=1)
        own.wait_for_publish(5)
        spoof.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while "meters/dev1/reading" not in received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert received == ["meters/dev1/reading"]
        assert acks[spoof.mid] == 0x87  # MQTT 5 PUBACK: Not authorized
        assert acks[own.mid] == 0
        for c in (dev, bridge):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_token_check_is_constant_time_and_checks_every_token() -> None:
    """BearerAuth compares with hmac.compare_digest against every configured token."""
    from api.app import BearerAuth

    auth = BearerAuth(app=None, tokens=("alpha", "beta"))  # type: ignore[arg-type]
    assert auth.allowed(b"beta") and auth.allowed(b"alpha")
    assert not auth.allowed(b"alph") and not auth.allowed(b"")
    import inspect

    assert "compare_digest" in inspect.getsource(BearerAuth.allowed)
