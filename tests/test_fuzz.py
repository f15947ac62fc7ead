"""Fuzz every way JSON and uploads reach the server: no 500s, no crash, no dropped socket, no leaked session.

Hostile classes: nesting deeper than the parser allows, integers of hundreds of digits, floats that overflow,
NaN/Infinity, lone surrogates (escaped and raw), repeated keys, wrong types, non-object top levels, oversize
bodies, garbage text. Deterministic (``derandomize``, no example database). The cases, 14,020 in all:

* the parse functions called directly, 10 cases per hypothesis example: 9 parsers x 80 examples of JSON texts
  (7,200) and 9 x 50 examples of Python values (4,500);
* every JSON route through the real app: 7 routes x 200 bodies (1,400);
* the websocket, one connection: 800 messages, each answered by an ``error`` event, a ``ping`` after each 50;
* uploads: 120 bodies.

The module prints the number of cases that ran.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from fluidsrv.errors import UserError
from fluidsrv.protocol import (
    MAX_FLOAT_CHARS,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    parse_client_message,
    parse_face_choice,
    parse_json,
    parse_layer_spec,
    parse_loop_request,
    parse_mix_request,
    parse_morph_request,
    parse_sefa_request,
    parse_slider_values,
    parse_stage_switch,
    parse_text_request,
)
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from fluidsrv.web.requests import MAX_JSON_BYTES
from tests.server_support import SMALL_PHOTO, receive_until, small_settings


def fuzz(examples: int) -> settings:
    """Deterministic hypothesis settings running ``examples`` cases."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


CASES: Counter[str] = Counter()
BATCH = 10  # cases drawn per hypothesis example of the pure parser tests: the engine's overhead is per example
TEXT_EXAMPLES = 80
VALUE_EXAMPLES = 50
ADMIN_TOKEN = "fuzz-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # stage switches (and, on some servers, /api/stats) need it
WS_MAX_BYTES = 8 * 1024


@pytest.fixture(scope="module", autouse=True)
def report_cases() -> Iterator[None]:
    yield
    print(f"\nfuzz cases run: {sum(CASES.values())} ({dict(CASES)})")


# ---- hostile JSON, as text ------------------------------------------------------------------------------------

SIGN = st.sampled_from(["", "-"])
HUGE_INT = st.tuples(SIGN, st.integers(MAX_INT_DIGITS + 1, 600)).map(lambda parts: parts[0] + "7" * parts[1])
OVERFLOW_FLOAT = st.one_of(
    st.tuples(SIGN, st.integers(309, 10**6)).map(lambda parts: f"{parts[0]}1.5e{parts[1]}"),
    st.integers(MAX_FLOAT_CHARS, 2000).map(lambda n: "0." + "3" * n),
)
CONSTANT = st.sampled_from(["NaN", "Infinity", "-Infinity"])
LONE_SURROGATE = st.one_of(
    st.integers(0xD800, 0xDFFF).map(lambda code: f'"\\u{code:04x}"'),
    st.integers(0xD800, 0xDBFF).map(lambda code: f'"\\u{code:04x}\\u{code:04x}"'),  # high + high
    st.integers(0xD800, 0xDFFF).map(lambda code: f'"a{chr(code)}b"'),  # a raw surrogate in the text
)
DEEP = st.tuples(st.integers(MAX_JSON_DEPTH + 1, 5000), st.sampled_from(["[", '{"a": ', '[{"b": '])).map(
    lambda parts: parts[1] * parts[0] + "1" + "".join({"[": "]", "{": "}"}[c] for c in parts[1] if c in "[{")[::-1]
    * parts[0]
)
UNCLOSED = st.integers(MAX_JSON_DEPTH + 1, 30_000).map(lambda n: "[" * n)
WRONG_TYPE = st.sampled_from(['"x"', '""', "[]", "[1, 2, 3]", "{}", "true", "false", "null", "1.5", "-1",
                              "10000000000", "[0, 9999]", '{"session_id": 1}', '"   "', '[true, false]'])
REFUSED_LITERAL = st.one_of(HUGE_INT, OVERFLOW_FLOAT, CONSTANT, LONE_SURROGATE, DEEP)
"""JSON values that parse_json must refuse wherever they stand."""

WRAPS = ["{0}", "[{0}]", '[{{"session_id": {0}, "token": "t"}}, {{"session_id": "s", "token": "t"}}]',
         '{{"session_id": "s", "token": {0}}}', '{{"a": {0}}}', '{{"age": {0}}}']


def in_field(fields: list[str], literal: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A JSON object with one of ``fields`` set to ``literal``, bare or wrapped in a list or a face."""
    return st.tuples(st.sampled_from(fields), st.sampled_from(WRAPS), literal).map(
        lambda parts: "{" + json.dumps(parts[0]) + ": " + parts[1].format(parts[2]) + "}")


def refused_json(fields: list[str]) -> st.SearchStrategy[str]:
    """JSON texts that parse_json refuses: hostile values at the top or in a field, repeated keys, unclosed."""
    return st.one_of(
        REFUSED_LITERAL,
        in_field(fields, REFUSED_LITERAL),
        UNCLOSED,
        st.sampled_from(fields).map(lambda field: "{" + f'"{field}": 1, "{field}": 2' + "}"),
    )


def odd_json(fields: list[str]) -> st.SearchStrategy[str]:
    """Texts that may parse but are wrong for the parser: wrong types, non-objects, garbage."""
    return st.one_of(WRONG_TYPE, in_field(fields, WRONG_TYPE), st.text(max_size=60))


def hostile_json(fields: list[str]) -> st.SearchStrategy[str]:
    """Every hostile JSON text for a parser reading ``fields``."""
    return st.one_of(refused_json(fields), odd_json(fields))


# ---- the parsers, called directly --------------------------------------------------------------------------------

PARSERS: dict[str, tuple[Callable[[Any], object], list[str]]] = {
    "face": (lambda data: parse_face_choice(data, 1), ["index"]),
    "stage": (parse_stage_switch, ["stage", "name"]),
    "sefa": (parse_sefa_request, ["layers", "k"]),
    "text": (parse_text_request, ["prompt", "layers"]),
    "mix": (parse_mix_request, ["faces", "percent", "layers"]),
    "morph": (parse_morph_request, ["faces", "frames_per_transition", "loop", "format"]),
    "loop": (parse_loop_request, ["face", "layers", "frames", "amplitude", "seed", "format"]),
}
CLIENT_FIELDS = ["type", "seq", "values", "commit"]
ALL_FIELDS = sorted({field for _, fields in PARSERS.values() for field in fields} | set(CLIENT_FIELDS))


def assert_refusal(error: UserError) -> None:
    assert 400 <= error.status < 500 and error.code and error.message, error


def parse_body(parser: Callable[[Any], object], text: str) -> None:
    """What a JSON route does with a body: parse_json, then the route's parser; only 4xx refusals may escape."""
    try:
        parser(parse_json(text))
    except UserError as error:
        assert_refusal(error)


def must_refuse(parse: Callable[[str], object], text: str) -> None:
    """``parse(text)`` must raise a 4xx UserError and nothing else."""
    with pytest.raises(UserError) as raised:
        parse(text)
    assert_refusal(raised.value)


def labelled_texts(fields: list[str]) -> st.SearchStrategy[list[tuple[bool, str]]]:
    """A batch of (parse_json must refuse it, text) for a parser reading ``fields``."""
    one = refused_json(fields).map(lambda text: (True, text)) | odd_json(fields).map(lambda text: (False, text))
    return st.lists(one, min_size=BATCH, max_size=BATCH)


@pytest.mark.parametrize("name", [*PARSERS, "client", "json"])
@fuzz(TEXT_EXAMPLES)
@given(data=st.data())
def test_parsers_refuse_hostile_json_with_4xx_only(name: str, data: st.DataObject) -> None:
    fields = PARSERS[name][1] if name in PARSERS else CLIENT_FIELDS if name == "client" else ALL_FIELDS
    for refused, text in data.draw(labelled_texts(fields)):
        CASES["parse text"] += 1
        if name == "client":
            must_refuse(lambda message: parse_client_message(message, 1 << 20), text)
        elif refused:
            must_refuse(parse_json, text)
        else:
            parse_body(PARSERS[name][0] if name in PARSERS else lambda value: value, text)


PY_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.tuples(st.sampled_from([1, -1]), st.integers(30, 5000)).map(
        lambda parts: parts[0] * 10 ** parts[1] + 7),  # beyond float range and beyond int's 4300 printable digits
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.integers(0xD800, 0xDFFF).map(chr), st.integers(0, 400).map(lambda n: "y" * n),
)
PY_VALUES = st.recursive(
    PY_SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(ALL_FIELDS) | st.text(max_size=6), children, max_size=4), max_leaves=10)


PY_BODIES = st.lists(PY_VALUES | st.dictionaries(st.sampled_from(ALL_FIELDS), PY_VALUES, max_size=4),
                     min_size=BATCH, max_size=BATCH)


@pytest.mark.parametrize("name", [*PARSERS, "slider values", "layers"])
@fuzz(VALUE_EXAMPLES)
@given(values=PY_BODIES)
def test_parsers_take_any_python_value(name: str, values: list[Any]) -> None:
    parser = {"slider values": parse_slider_values, "layers": parse_layer_spec}.get(name) or PARSERS[name][0]
    for value in values:
        CASES["parse value"] += 1
        try:
            parser(value)
        except UserError as error:
            assert_refusal(error)


# ---- the real app ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = small_settings(tmp_path_factory.mktemp("fuzz"), admin_token=ADMIN_TOKEN,
                            max_ws_messages_per_second=1e6, max_ws_message_bytes=WS_MAX_BYTES)
    with TestClient(create_app(config, runtime=Runtime.build(config))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def session(client: TestClient, shared_dir: Path) -> dict:
    """A session with its faces found (not prepared: every body here is refused before the work would start)."""
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
    created = client.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
    assert created["faces"], created
    return {"session_id": created["session_id"], "token": created["token"]}  # short in hypothesis's reports


JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def sessions_in_memory(client: TestClient) -> int:
    count: int = client.get("/api/stats", headers=ADMIN).json()["sessions"]["in_memory"]
    return count


@fuzz(120)
@given(body=st.one_of(st.binary(max_size=4096), st.binary(max_size=2048).map(lambda b: JPEG_HEAD + b),
                      st.binary(max_size=2048).map(lambda b: PNG_HEAD + b)),
       multipart=st.booleans(), content_type=st.sampled_from(["image/jpeg", "image/png", "text/plain", ""]))
def test_upload_fuzz_never_500s_or_leaks(client: TestClient, body: bytes, multipart: bool, content_type: str) -> None:
    CASES["upload"] += 1
    before = sessions_in_memory(client)
    if multipart:
        response = client.post("/api/sessions", files={"file": ("f", body, content_type or "application/octet-stream")})
    else:
        response = client.post("/api/sessions", content=body, headers={"Content-Type": content_type})
    assert response.status_code in (400, 413, 415, 422), response.text
    assert response.json()["error"]["code"]
    assert sessions_in_memory(client) == before


ROUTES = {  # every route reading a JSON body, and the parser whose fields it reads
    "/api/sessions/{id}/face": "face",
    "/api/config/stages": "stage",
    "/api/sessions/{id}/directions/sefa": "sefa",
    "/api/sessions/{id}/directions/text": "text",
    "/api/tools/mix": "mix",
    "/api/tools/morph": "morph",
    "/api/tools/loop": "loop",
}
OVERSIZE = st.integers(MAX_JSON_BYTES + 1, MAX_JSON_BYTES + 2048).map(lambda n: '{"a": "' + "x" * n + '"}')
NOT_UTF8 = st.binary(min_size=1, max_size=40).map(lambda raw: b'{"a": "\xff' + raw + b'"}')


def route_bodies(fields: list[str]) -> st.SearchStrategy[bytes]:
    """Bodies for a route reading ``fields``: hostile JSON (UTF-8, raw surrogates kept), oversize, not UTF-8."""
    hostile = hostile_json(fields) | hostile_json(ALL_FIELDS)
    return hostile.map(lambda text: text.encode("utf-8", "surrogatepass")) | OVERSIZE.map(str.encode) | NOT_UTF8


@pytest.mark.parametrize("route", ROUTES)
@fuzz(200)
@given(data=st.data())
def test_json_routes_never_500(client: TestClient, session: dict, route: str, data: st.DataObject) -> None:
    CASES["route"] += 1
    body = data.draw(route_bodies(PARSERS[ROUTES[route]][1]))
    session_id, token = session["session_id"], session["token"]
    headers = {"Content-Type": "application/json", **(ADMIN if route == "/api/config/stages" else {})}
    if "{id}" in route:
        headers["Authorization"] = f"Bearer {token}"
    response = client.post(route.replace("{id}", session_id), content=body, headers=headers)
    assert response.status_code < 500, response.text
    assert response.status_code >= 400 and response.json()["error"]["code"], response.text


# ---- the websocket -----------------------------------------------------------------------------------------------

WS_MESSAGES = st.one_of(
    hostile_json(CLIENT_FIELDS),
    st.sampled_from(["sliders", "undo", "redo", "explode"]).flatmap(
        lambda kind: in_field(["seq", "values", "commit"], REFUSED_LITERAL | WRONG_TYPE).map(
            lambda text: '{"type": "' + kind + '", ' + text[1:])),
    in_field(["seq", "values", "commit"], REFUSED_LITERAL).map(lambda text: '{"type": "ping", ' + text[1:]),
    st.integers(WS_MAX_BYTES + 1, 2 * WS_MAX_BYTES).map(lambda n: '{"type": "ping", "pad": "' + "x" * n + '"}'),
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def socket(client: TestClient, session: dict) -> Iterator[Any]:
    url = f"/api/sessions/{session['session_id']}/ws?token={session['token']}"
    with client.websocket_connect(url) as connection:
        receive_until(connection, "state")
        yield connection


@fuzz(800)
@given(message=WS_MESSAGES)
def test_websocket_answers_each_bad_message_with_an_error(socket: Any, message: str | bytes) -> None:
    CASES["websocket"] += 1
    if isinstance(message, bytes):
        socket.send_bytes(message)
    else:
        socket.send_text(message)
    error, before = receive_until(socket, "error")
    assert error["code"] and error["message"], error
    assert all(not isinstance(item, dict) or item["type"] in ("sliders", "progress") for item in before), before
    if CASES["websocket"] % 50 == 0:
        socket.send_text(json.dumps({"type": "ping"}))
        receive_until(socket, "pong")  # the connection survived whatever came before


def test_the_websocket_still_answers_a_ping(socket: Any, client: TestClient) -> None:
    socket.send_text(json.dumps({"type": "ping"}))
    receive_until(socket, "pong")
    assert client.get("/api/health").status_code == 200
