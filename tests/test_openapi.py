"""The OpenAPI document: valid OpenAPI 3.1, lists every route, and holds true of the live API (schemathesis)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from api.app import create_app
from api.config import ApiSettings
from api.openapi import document, served

from .conftest import ApiServer, Publisher, unique, wait_for_rows
from .test_api_commands import FakeDevice, fake_device
from .test_api_pump import status_doc
from .test_fuzz import answer_read_obis

__all__ = ["fake_device"]  # the fixture, shared with the command tests

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 15
MISSING = "zz-no-such-device"
NO_SUCH_ID = 2**62


def app_routes() -> list[BaseRoute]:
    """The Starlette app's routes, under whatever ASGI wrappers create_app puts around it (Socket.IO)."""
    app: Any = create_app(ApiSettings())
    while not isinstance(app, Starlette):
        app = getattr(app, "other_asgi_app", None) or app.app
    return list(app.routes)


def operations_of(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    """Every operation of the document; one schemathesis cannot use fails the test, naming why."""
    out = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"unusable operation: {result.err()}"
        out.append(result.ok())
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item}


async def test_the_document_is_valid_openapi(api_server: ApiServer) -> None:
    """GET /openapi.json is public, OpenAPI 3.1, and schemathesis loads every operation of it."""
    async with httpx.AsyncClient(base_url=api_server.base_url) as anonymous:  # no token: the document is public
        r = await anonymous.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(copy.deepcopy(doc))
    schema.validate()  # against the OpenAPI meta-schema
    operations = operations_of(schema)
    assert {(op.path, op.method.lower()) for op in operations} == documented(doc)
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    # request bodies are the models that validate them, not hand-written copies
    assert "kwhConsumedAc" in doc["components"]["schemas"]["MeterReadingIn"]["properties"]
    assert doc["components"]["schemas"]["PumpIn"]["required"] == ["running"]


async def test_every_route_is_documented(api_server: ApiServer) -> None:
    """Every HTTP route the app serves is in the document, and the document lists nothing else."""
    routes = served(app_routes())
    assert ("/openapi.json", "get") in routes
    async with api_server.client() as http:
        doc = (await http.get("/openapi.json")).json()
    assert routes - documented(doc) == set(), "routes missing from the OpenAPI document"
    assert documented(doc) - routes == set(), "documented operations the app does not serve"
    assert doc == orjson.loads(orjson.dumps(document(app_routes())))


async def test_every_operation_declares_its_errors() -> None:
    """Each operation declares 401 unless public, and each body 400, 413 and 422 with the error shape."""
    doc = document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            if op.get("security") != []:
                assert "401" in codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413", "422"} <= codes, (method, path)
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["required"] == ["code", "message"]


def restricted(doc: dict[str, Any], ids: dict[str, list[str]]) -> dict[str, Any]:
    """The document narrowed so that generated requests touch only what the test made: the database is shared.

    Body ids name only the test's devices, path ids those or one that does not exist; alert rules are
    created for the test's devices only (never kind-wide), and no existing alert or rule is changed.
    """
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name, known in ids.items():
        schemas[name] = {"type": "string", "enum": known}
    rule = schemas["RuleIn"]
    rule["properties"]["deviceId"] = {"$ref": "#/components/schemas/DeviceId"}
    rule["required"] = [*rule.get("required", []), "deviceId"]
    for item in doc["paths"].values():
        for method, op in item.items():
            for param in op.get("parameters", []):
                target = param.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
                if param.get("in") == "path" and target in ids:
                    param["schema"] = {"type": "string", "enum": [*ids[target], MISSING]}
                elif param.get("in") == "path" and target in ("AlertId", "RuleId") and method != "get":
                    param["schema"] = {"type": "integer", "enum": [NO_SUCH_ID]}
    return doc


# creating a rule from a negative case could make one for every device of a kind
POSITIVE_ONLY = {("POST", "/api/v1/alerts/rules")}


def run_schemathesis(doc: dict[str, Any], base_url: str, headers: dict[str, str]) -> list[str]:
    """Positive and negative cases for every operation; the failures, described."""
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    for operation in operations_of(schema):
        raw = doc["paths"][operation.path][operation.method.lower()]
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and (
                (operation.method.upper(), operation.path) in POSITIVE_ONLY
                or not (raw.get("parameters") or raw.get("requestBody"))  # nothing to get wrong
            ):
                continue

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=30)
                case.validate_response(response, checks=CHECKS, headers=headers)

            try:
                check()
            except Exception as exc:  # one report for every operation, not just the first that fails
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    return failures


# the bridge's and the server's threads draw from `random` while hypothesis generates in this one
@pytest.mark.filterwarnings("ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning")
async def test_schemathesis_finds_the_api_true_to_its_document(
    api_server: ApiServer, publisher: Publisher, fake_device: Callable[..., FakeDevice]
) -> None:
    """Generated valid and invalid requests to every operation: never a 500, and every answer (status code,
    content type, body) is one the document declares."""
    meter, vehicle, pump = unique("oa-m"), unique("oa-v"), unique("oa-p")
    publisher.publish(f"meters/{meter}/reading", orjson.dumps({"totalPowerKw": 3.0}))
    publisher.publish(f"meters/{meter}/obis", orjson.dumps({"1-0:1.8.0.255": 1234.5}))
    publisher.publish(f"vehicles/{vehicle}/reading", orjson.dumps({"soc": 50}))
    publisher.publish(f"pumps/{pump}/status", orjson.dumps(status_doc(pump)))
    await wait_for_rows(
        api_server.settings.core.database_url,
        "SELECT 1 FROM devices WHERE device_id IN (%s, %s, %s)",
        (meter, vehicle, pump),
        3,
    )
    fake_device("meters", meter, answer_read_obis)  # read-obis gets its answer rather than waiting it out
    fake_device("pumps", pump)
    async with api_server.client() as http:
        doc = (await http.get("/openapi.json")).json()
    ids = {"MeterId": [meter], "VehicleId": [vehicle], "PumpId": [pump], "DeviceId": [meter, vehicle, pump]}
    failures = await asyncio.to_thread(run_schemathesis, restricted(doc, ids), api_server.base_url, api_server.headers)
    assert not failures, "\n\n".join(failures)
