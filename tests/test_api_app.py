"""The app's cross-cutting behaviour: CORS for EMS browsers, 503 while the database is away."""

from __future__ import annotations

from typing import Any

import httpx

from api.app import create_app
from api.config import ApiSettings

from .faults.conftest import free_port


def settings(**env: str) -> ApiSettings:
    return ApiSettings.from_env(
        {
            "API_TOKENS": "t0k",
            "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x",
            **env,
        }
    )


async def test_cors_preflight_is_answered_for_allowed_origins_only() -> None:
    """ALLOWED_ORIGINS (EMS's variable) opens the API to those browser origins, without a token on preflight."""
    app = create_app(settings(ALLOWED_ORIGINS="https://ems.example"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        headers = {
            "Origin": "https://ems.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        }
        ok = await client.options("/api/meters", headers=headers)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ems.example"
        bad = await client.options("/api/meters", headers={**headers, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in bad.headers


async def test_database_down_answers_503_everywhere() -> None:
    """With no database reachable, reads answer 503 in the error shape (never 500)."""
    app: Any = create_app(settings())
    starlette_app = app.other_asgi_app  # behind the Socket.IO wrapper
    async with starlette_app.router.lifespan_context(starlette_app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", timeout=30, headers={"Authorization": "Bearer t0k"}
        ) as client:
            for path in (
                "/api/v1/devices/status",
                "/api/meters/m1/obis-readings",
                "/api/v1/devices/system/stats",
                "/api/meters",
                "/v1/analytics/performance/v1",
            ):
                response = await client.get(path)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["error"]["code"] == "unavailable"
