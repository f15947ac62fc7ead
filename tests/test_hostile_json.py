"""Hostile JSON, one example of each kind: the parsers and the routes refuse it with a 4xx, never a 500."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from fluidsrv.protocol import (
    MAX_JSON_DEPTH,
    ApiError,
    json_depth,
    parse_client_message,
    parse_face_choice,
    parse_json,
    parse_loop_request,
    parse_mix_request,
    parse_morph_request,
    parse_slider_values,
)
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, receive_until, small_settings

ADMIN_TOKEN = "hostile-admin-token"
FACE = {"session_id": "s", "token": "t"}

HOSTILE = {  # text -> the code parse_json refuses it with
    "[" * 30_000: "too_deep",
    "{" + '"a": {' * 40 + "}" * 41: "too_deep",
    "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1): "too_deep",
    '{"a": ' + "9" * 400 + "}": "bad_number",
    '{"a": -' + "9" * 31 + "}": "bad_number",
    '{"a": 1e400}': "bad_number",
    '{"a": -1.5E+309}': "bad_number",
    '{"a": 0.' + "1" * 100 + "}": "bad_number",
    '{"a": NaN}': "bad_number",
    '{"a": Infinity}': "bad_number",
    '{"a": [-Infinity]}': "bad_number",
    '{"a": "\\ud800"}': "bad_string",
    '{"\\udfff": 1}': "bad_string",
    '["x", ["\\ud83d\\ud83d"]]': "bad_string",
    '{"a": "\ud800"}': "bad_string",  # a raw lone surrogate in the text
    '{"a": 1, "a": 2}': "duplicate_key",
    "{not json": "bad_json",
    "": "bad_json",
}


@pytest.mark.parametrize("text", HOSTILE)
def test_parse_json_refuses_each_hostile_kind(text: str) -> None:
    with pytest.raises(ApiError) as raised:
        parse_json(text)
    assert raised.value.status == 422 and raised.value.code == HOSTILE[text]


def test_parse_json_takes_what_is_fine() -> None:
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(nested) is not None
    assert parse_json('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": "\\"[[["}') == {
        "a": "[" * 51, "b": '"[[['}  # brackets inside strings do not nest
    assert parse_json('{"smile": "\\ud83d\\ude00", "n": -' + "9" * 30 + ', "x": 1.7976931348623157e308}') == {
        "smile": "😀", "n": -int("9" * 30), "x": 1.7976931348623157e308}
    assert parse_json(b'{"a": [1, 2.5, true, null]}') == {"a": [1, 2.5, True, None]}
    with pytest.raises(ApiError) as raised:
        parse_json(b'{"a": "\xff"}')
    assert raised.value.code == "bad_json"


@pytest.mark.parametrize("text", ['"' + '\\"' * 40_000, '"\\' * 40_000, "[" * 60_000, '"' * 60_000, "[]" * 30_000])
def test_the_depth_scan_is_linear(text: str) -> None:
    started = time.perf_counter()
    json_depth(text)
    assert time.perf_counter() - started < 0.5


def test_the_websocket_parser_answers_hostile_messages_with_api_errors() -> None:
    for text in HOSTILE:
        with pytest.raises(ApiError):
            parse_client_message(text, 1 << 20)
    for text in ['{"type": [1]}', '{"type": {"a": 1}}', '"ping"', "[]", '{"seq": 1, "values": {"a": ' + "9" * 30 + "}}",
                 '{"seq": 1e3, "values": {}}', '{"seq": 1, "values": {"a": 1}, "commit": "yes"}']:
        with pytest.raises(ApiError):
            parse_client_message(text, 1 << 20)
    with pytest.raises(ApiError) as raised:
        parse_client_message('{"type": "ping", "pad": "' + "é" * 600 + '"}', 1000)  # 1,200 bytes of UTF-8
    assert raised.value.status == 413


VALUE_CASES: list[tuple[Any, Any]] = [  # (parser, python value) that once raised OverflowError, TypeError, ...
    (parse_slider_values, {"a": 10**400}),
    (parse_slider_values, {"a": -(10**400)}),
    (parse_slider_values, {"\ud800": 1.0}),
    (parse_loop_request, {"face": FACE, "amplitude": 10**400}),
    (parse_loop_request, {"face": FACE, "amplitude": float("nan")}),
    (parse_loop_request, {"face": FACE, "format": []}),
    (parse_loop_request, {"face": FACE, "layers": "\udc00"}),
    (parse_mix_request, {"faces": [FACE, FACE], "percent": -(10**400)}),
    (parse_mix_request, {"faces": [FACE, {"session_id": "\ud800", "token": "t"}]}),
    (parse_morph_request, {"faces": [FACE, FACE], "format": {"mp4": 1}}),
    (lambda value: parse_face_choice(value, 1), {"index": 10**5000}),  # more digits than int() will print
]


@pytest.mark.parametrize(("parser", "value"), VALUE_CASES)
def test_parsers_refuse_odd_python_values_with_422(parser: Any, value: Any) -> None:
    with pytest.raises(ApiError) as raised:
        parser(value)
    assert raised.value.status == 422 and len(raised.value.message) < 200


# ---- through the app ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = small_settings(tmp_path_factory.mktemp("hostile"), admin_token=ADMIN_TOKEN)
    with TestClient(create_app(config, runtime=Runtime.build(config))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def session(client: TestClient, shared_dir: Path) -> dict[str, str]:
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
    created = client.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
    return {"session_id": created["session_id"], "token": created["token"]}


ROUTES = ["/api/sessions/{id}/face", "/api/sessions/{id}/directions/sefa", "/api/sessions/{id}/directions/text",
          "/api/tools/mix", "/api/tools/morph", "/api/tools/loop", "/api/config/stages"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("text", ["[" * 30_000, '{"index": ' + "9" * 400 + "}", '{"percent": 1e400}',
                                  '{"k": NaN}', '{"prompt": "\\ud800"}', "[1, 2]", '"a string"'])
def test_json_routes_answer_4xx(client: TestClient, session: dict[str, str], route: str, text: str) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {session['token']}"}
    if route == "/api/config/stages":
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    response = client.post(route.replace("{id}", session["session_id"]), content=text, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["code"]


def test_the_websocket_survives_hostile_messages(client: TestClient, session: dict[str, str]) -> None:
    url = f"/api/sessions/{session['session_id']}/ws?token={session['token']}"
    with client.websocket_connect(url) as socket:
        receive_until(socket, "state")
        for text, code in [("[" * 30_000, "too_deep"), ('{"seq": ' + "9" * 400 + "}", "bad_number"),
                           ('{"seq": 1, "values": {"a": NaN}}', "bad_number"), ('{"type": "\\ud800"}', "bad_string")]:
            socket.send_text(text)
            assert receive_until(socket, "error")[0]["code"] == code
        socket.send_text(json.dumps({"type": "ping"}))
        receive_until(socket, "pong")


def test_the_admin_token_counts_only_as_a_bearer_header(client: TestClient) -> None:
    body = {"stage": "no-such-stage", "name": "x"}
    for sent in [{"params": {"token": ADMIN_TOKEN}}, {"headers": {"X-Session-Token": ADMIN_TOKEN}}]:
        refused = client.post("/api/config/stages", json=body, **sent)  # type: ignore[arg-type]
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "bad_admin_token", sent
    accepted = client.post("/api/config/stages", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert accepted.status_code == 422  # past the token: the unknown stage is refused


def test_session_tokens_still_come_three_ways(client: TestClient, session: dict[str, str]) -> None:
    url, token = f"/api/sessions/{session['session_id']}", session["token"]
    assert client.get(url, params={"token": token}).status_code == 200
    assert client.get(url, headers={"X-Session-Token": token}).status_code == 200
    assert client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
