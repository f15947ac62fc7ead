"""The OpenAPI and AsyncAPI documents: valid, covering every route of the app, and agreeing with the parsers."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient

from fluidsrv import protocol
from fluidsrv.protocol import ApiError, decode_frame, encode_frame, parse_client_message, responses
from fluidsrv.session.model import Status
from fluidsrv.settings import Settings
from fluidsrv.web import create_app
from fluidsrv.web.asyncapi import FRAME_LAYOUT, asyncapi_document
from fluidsrv.web.openapi import openapi_document
from fluidsrv.wire_fields import Either, Integer, ListOf, Number, Shape
from tests.server_support import small_settings

FACE = {"session_id": "a" * 32, "token": "t" * 43}
VALID_BODIES: dict[str, tuple[Callable[[Any], Any], dict[str, Any]]] = {
    "FaceChoice": (lambda body: protocol.parse_face_choice(body, 10**9), {"index": 0}),
    "StageSwitch": (protocol.parse_stage_switch, {"stage": "inpainter", "name": "telea"}),
    "SefaRequest": (protocol.parse_sefa_request, {"layers": [0, 4]}),
    "TextRequest": (protocol.parse_text_request, {"prompt": "smiling"}),
    "MixRequest": (protocol.parse_mix_request, {"faces": [FACE, FACE]}),
    "MorphRequest": (protocol.parse_morph_request, {"faces": [FACE, FACE]}),
    "LoopRequest": (protocol.parse_loop_request, {"face": FACE}),
}
"""Each request body's parser and a small body it accepts."""


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return small_settings(tmp_path_factory.mktemp("openapi"))


@pytest.fixture(scope="module")
def document(settings: Settings) -> dict[str, Any]:
    return openapi_document(settings)


@pytest.fixture(scope="module")
def asyncapi(settings: Settings) -> dict[str, Any]:
    return asyncapi_document(settings)


def test_the_openapi_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema (and unresolvable $refs)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    broken = copy.deepcopy(document)
    broken["paths"]["/api/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "$ref": "#/components/schemas/Nowhere"}
    with pytest.raises(Exception, match="Nowhere"):
        validate(broken)


def app_routes(app: Any) -> Iterator[tuple[str, str]]:
    """(kind, "METHOD /path") of every route of the app; "ws" for websockets; the static files left out."""
    for route in app.routes:
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            continue
        path = re.sub(r":\w+}", "}", getattr(route, "path", ""))  # {session_id:str} -> {session_id}
        if isinstance(route, WebSocketRoute):
            yield "ws", path
        elif isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":  # Starlette adds HEAD to every GET route
                    yield "http", f"{method} {path}"
        else:
            raise AssertionError(f"a route of a kind this test does not know: {route!r}")


def test_every_route_of_the_app_is_documented(settings: Settings, document: dict[str, Any],
                                              asyncapi: dict[str, Any]) -> None:
    routes = list(app_routes(create_app(settings)))
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    channels = {channel["address"] for channel in asyncapi["channels"].values()}
    missing = [route for kind, route in routes if kind == "http" and route not in documented]
    assert not missing, f"routes missing from the OpenAPI document: {missing}"
    sockets = [route for kind, route in routes if kind == "ws"]
    assert sockets and all(route in channels for route in sockets), (sockets, channels)
    assert document["x-websocket"]["address"] in channels
    # and the reverse: the documents name nothing the app does not serve
    assert documented == {route for kind, route in routes if kind == "http"}
    assert channels == set(sockets)


def test_the_limits_in_the_document_are_the_settings(document: dict[str, Any], settings: Settings) -> None:
    limits = document["components"]["schemas"]["Config"]["properties"]["limits"]
    assert set(limits["required"]) == set(responses.CONFIG_LIMITS)
    assert limits["properties"]["max_sessions"]["type"] == "integer"
    assert limits["properties"]["max_ws_messages_per_second"]["type"] == "number"
    assert str(settings.max_upload_bytes) in document["info"]["description"]
    loop = document["components"]["schemas"]["LoopRequest"]["properties"]
    assert loop["frames"]["maximum"] == protocol.MAX_VIDEO_FRAMES and loop["format"]["enum"] == ["mp4", "gif"]
    assert set(document["components"]["securitySchemes"]) == {"sessionBearer", "sessionQuery", "sessionHeader",
                                                              "adminBearer"}


def _bounded_fields(shape: Shape, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, field) of every bounded number or list length in a request body (lists: the first item's fields)."""
    for name, spec in shape.fields.items():
        path = (*prefix, name)
        if isinstance(spec, Integer | Number | ListOf):
            yield path, spec
        if isinstance(spec, ListOf) and isinstance(spec.item, Shape):
            yield from _bounded_fields(spec.item, (*path, 0))
        if isinstance(spec, Shape):
            yield from _bounded_fields(spec, path)


def _with(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    target: Any = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def _edge_values(spec: Any, current: Any) -> Iterator[tuple[Any, bool]]:
    """(value, accepted?) at and just beyond each bound the field declares."""
    if isinstance(spec, ListOf):
        item = current[0] if current else None
        yield [item] * spec.min_items, True
        if spec.min_items:
            yield [item] * (spec.min_items - 1), False
        if spec.max_items is not None:
            yield [item] * spec.max_items, True
            yield [item] * (spec.max_items + 1), False
        return
    step = 1 if isinstance(spec, Integer) else 1e-6
    if spec.low is not None:
        yield spec.low, True
        yield spec.low - step, False
    if spec.high is not None:
        yield spec.high, True
        yield spec.high + step, False
    yield True, False  # a boolean is not a number


@pytest.mark.parametrize("name", sorted(VALID_BODIES))
def test_each_parser_accepts_exactly_what_its_schema_bounds(name: str) -> None:
    shape = protocol.REQUEST_BODIES[name]
    parse, body = VALID_BODIES[name]
    schema = shape.schema()
    jsonschema.validate(body, schema)
    parse(body)
    checked = 0
    for path, spec in _bounded_fields(shape):
        current: Any = body
        for key in path[:-1]:
            current = current[key]
        for value, accepted in _edge_values(spec, current.get(path[-1]) if isinstance(current, dict) else None):
            if isinstance(spec, ListOf) and value and value[0] is None:
                continue  # an optional list the body leaves out
            candidate = _with(body, path, value)
            valid = jsonschema.Draft202012Validator(schema).is_valid(candidate)
            assert valid == accepted, (name, path, value)
            if accepted:
                parse(candidate)
            else:
                with pytest.raises(ApiError) as refused:
                    parse(candidate)
                assert 400 <= refused.value.status < 500
            checked += 1
    assert checked or name in {"StageSwitch", "TextRequest"}
    for required in shape.required:  # a body without a required field is refused by both
        incomplete = {key: value for key, value in body.items() if key != required}
        assert not jsonschema.Draft202012Validator(schema).is_valid(incomplete)
        with pytest.raises(ApiError):
            parse(incomplete)


def test_text_fields_refuse_what_their_schema_refuses() -> None:
    schema = protocol.REQUEST_BODIES["TextRequest"].schema()
    for prompt, accepted in [("a" * protocol.MAX_PROMPT_CHARS, True), ("a" * (protocol.MAX_PROMPT_CHARS + 1), False),
                             ("   ", False), ("", False), ("  smile ", True)]:
        body = {"prompt": prompt}
        assert jsonschema.Draft202012Validator(schema).is_valid(body) == accepted, prompt
        if accepted:
            protocol.parse_text_request(body)
        else:
            with pytest.raises(ApiError):
                protocol.parse_text_request(body)
    layers = protocol.LAYERS
    assert isinstance(layers, Either)
    for raw, accepted in [("coarse", True), ([0, 3], True), ([0, protocol.MAX_LAYER_INDEX + 1], False),
                          ([1], False), ("x" * (protocol.MAX_NAME_CHARS + 1), False), ([True, 2], False)]:
        assert jsonschema.Draft202012Validator(layers.schema()).is_valid(raw) == accepted, raw
        assert (layers.check(raw) is not None) == accepted, raw


def test_session_statuses_are_the_models() -> None:
    assert set(responses.SESSION_STATUSES) == {status.value for status in Status}


def test_the_websocket_messages_in_the_asyncapi_document(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    messages = asyncapi["components"]["messages"]
    for message in messages.values():
        jsonschema.Draft202012Validator.check_schema(message["payload"])
    for operation in asyncapi["operations"].values():  # every reference resolves
        assert operation["channel"]["$ref"] == "#/channels/session"
        for ref in operation["messages"]:
            name = ref["$ref"].removeprefix("#/channels/session/messages/")
            assert asyncapi["channels"]["session"]["messages"][name]["$ref"] == f"#/components/messages/{name}"
            assert name in messages
    sliders, history, ping = (messages[name]["payload"] for name in ("sliders", "history", "ping"))
    examples = [({"seq": 3, "values": {"age": 1.5}, "commit": True}, sliders, True),
                ({"type": "undo", "seq": 4}, history, True), ({"type": "ping"}, ping, True),
                ({"seq": -1, "values": {}}, sliders, False), ({"seq": 1, "values": {"a": 101}}, sliders, False),
                ({"seq": 1, "values": {"": 1}}, sliders, False), ({"type": "undo"}, history, False)]
    for example, schema, accepted in examples:
        assert jsonschema.Draft202012Validator(schema).is_valid(example) == accepted, example
        if accepted:
            parse_client_message(json.dumps(example), 65536)
        else:
            with pytest.raises(ApiError):
                parse_client_message(json.dumps(example), 65536)
    assert set(messages) >= {f"{kind}Event" for kind in responses.SERVER_EVENTS} | {"frame"}


def test_the_documented_frame_layout_reads_a_real_frame(asyncapi: dict[str, Any]) -> None:
    layout = {item["name"]: item for item in asyncapi["components"]["messages"]["frame"]["x-frame-layout"]}
    assert list(layout) == [item["name"] for item in FRAME_LAYOUT]
    frame = encode_frame(123456, b"\x89image", "jpeg", kind="progress")

    def field_bytes(name: str) -> bytes:
        item = layout[name]
        return frame[item["offset"]: item["offset"] + item["bytes"]]

    assert field_bytes("magic").decode() == layout["magic"]["value"]
    assert layout["kind"]["values"][str(field_bytes("kind")[0])] == "progress"
    assert layout["format"]["values"][str(field_bytes("format")[0])] == "jpeg"
    assert int.from_bytes(field_bytes("seq"), "big") == 123456
    assert frame[layout["image"]["offset"]:] == b"\x89image" == decode_frame(frame).image


def test_the_server_serves_both_documents_and_json_404s(settings: Settings, tmp_path: Path) -> None:
    from fluidsrv.runtime import Runtime

    app = create_app(settings, runtime=Runtime.build(settings))
    with TestClient(app) as client:
        served = client.get("/api/openapi.json")
        assert served.status_code == 200 and served.json() == openapi_document(settings)
        assert client.get("/api/asyncapi.json").json()["asyncapi"] == "3.0.0"
        missing = client.get("/api/no-such-route")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong_method = client.put("/api/health")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
        assert client.get("/no-such-file.css").status_code == 404  # outside /api/: the plain answer
        error_schema = openapi_document(settings)["components"]["schemas"]["Error"]
        jsonschema.validate(missing.json(), error_schema)
