"""Schemathesis against a live uvicorn server on loopback, driven by the server's own OpenAPI document.

Bounded and repeatable: a fixed number of examples per operation and mode, a fixed seed, no example database.
Every answer must be below 500 and match the documented status, content type and schema; data the schema refuses
must be refused (negative_data_rejection). The stateful part follows the document's links: create → pick the face
→ finalize → result (and get, undo, delete), with a real photo as the upload.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import jsonschema
import pytest
import schemathesis
import websockets.sync.client
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

from fluidsrv.protocol import decode_frame, responses
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from fluidsrv.web.asyncapi import FRAME_LAYOUT
from tests.server_support import SMALL_PHOTO, LiveServer, small_settings

SEED = 20261202
EXAMPLES_PER_OPERATION = 12  # per generation mode (positive, negative)
EXAMPLES_ON_A_REAL_SESSION = 6  # per mode, for the session routes with a prepared session's id and token
STATEFUL_SCENARIOS = 10
CHAIN = ("createSession", "chooseFace", "finalize", "getResult", "getSession", "getOriginal", "undo", "sefaDirections",
         "deleteSession")
"""The operations of the stateful run: a session's life along the document's links."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
STATEFUL_CHECKS = [*CHECKS, use_after_free]  # not ignored_auth: a wrong token answers 404 here, not 401 (see below)
READY_TIMEOUT = 120.0


def _settings(examples: int) -> hypothesis.settings:
    return hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                               suppress_health_check=list(hypothesis.HealthCheck), phases=[
                                   hypothesis.Phase.explicit, hypothesis.Phase.generate])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    options = {"encoder.project": {"steps": 3, "frame_every": 3}, "directions.sefa": {"k": 4}}  # quick prepares
    settings = small_settings(tmp_path_factory.mktemp("schemathesis"), max_sessions=256, finetune_steps=2,
                              plugin_options=options)
    with LiveServer(create_app(settings, runtime=Runtime.build(settings))) as host:
        yield f"http://{host}"


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


@pytest.fixture(scope="module")
def api(server: str) -> Any:
    return schemathesis.openapi.from_url(f"{server}/api/openapi.json")


def wait_until_ready(server: str, session_id: str, token: str) -> dict[str, Any]:
    """Poll the session until its face is prepared (or preparing stopped)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        state = httpx.get(f"{server}/api/sessions/{session_id}", params={"token": token}, timeout=30).json()
        if state.get("status") != "preparing" or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prepared(server: str, photo: bytes) -> dict[str, str]:
    created = httpx.post(f"{server}/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
    session_id, token = created["session_id"], created["token"]
    assert httpx.post(f"{server}/api/sessions/{session_id}/face", json={"index": 0}, params={"token": token},
                      timeout=30).status_code == 202
    assert wait_until_ready(server, session_id, token)["status"] == "ready"
    return {"session_id": session_id, "token": token}


class Tally:
    """Counts the cases run and keeps the first failure of each operation and mode."""

    def __init__(self) -> None:
        self.cases = 0
        self.failures: list[str] = []
        self.not_applicable: list[str] = []

    def run(self, label: str, strategy: Any, examples: int, base: str, checks: list[Any]) -> None:
        @hypothesis.settings(_settings(examples))
        @hypothesis.seed(SEED)
        @hypothesis.given(case=strategy)
        def one_case(case: Any) -> None:
            self.cases += 1
            case.call_and_validate(base_url=base, checks=checks, timeout=60)

        try:
            one_case()
        except hypothesis.errors.Unsatisfiable:  # negative mode on an operation that takes nothing to negate
            self.not_applicable.append(label)
        except Exception as error:  # collect every operation's failure, then fail once with all of them
            self.failures.append(f"{label}: {str(error)[:1500]}")


def test_every_operation_answers_as_documented(api: Any, server: str, prepared: dict[str, str]) -> None:
    tally = Tally()
    started = time.monotonic()
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        for mode, checks in ((schemathesis.GenerationMode.POSITIVE, CHECKS),
                             (schemathesis.GenerationMode.NEGATIVE, NEGATIVE_CHECKS)):
            tally.run(f"{operation.label} {mode.value}", operation.as_strategy(generation_mode=mode),
                      EXAMPLES_PER_OPERATION, server, checks)
            if "{session_id}" in operation.path and operation.method != "delete":  # again, on a real session
                strategy = operation.as_strategy(generation_mode=mode,
                                                 path_parameters={"session_id": prepared["session_id"]},
                                                 query={"token": prepared["token"]})
                tally.run(f"{operation.label} {mode.value} (real session)", strategy, EXAMPLES_ON_A_REAL_SESSION,
                          server, checks)
    elapsed = time.monotonic() - started
    print(f"schemathesis: {tally.cases} cases over {len(operations)} operations in {elapsed:.0f} s")
    assert not tally.failures, "\n\n".join(tally.failures)
    assert all(label.endswith(" negative") for label in tally.not_applicable), tally.not_applicable
    assert tally.cases >= len(operations) * 2


def test_the_stateful_links_create_pick_finalize(api: Any, server: str, photo: bytes) -> None:
    seen: list[tuple[str, int]] = []
    unauthorised: list[str] = []
    tokens: dict[str, str] = {}  # session id -> token, of the sessions this run created
    ready: set[str] = set()

    chain = api.include(operation_id=list(CHAIN))

    base = chain.as_state_machine()

    class Workflow(base):  # type: ignore[misc,valid-type]
        def before_call(self, case: Any) -> None:
            if case.operation.label == "POST /api/sessions":  # a photo with a face: a random body has none
                case.media_type = "multipart/form-data"
                case.body = {"file": photo}
            token = tokens.get((case.path_parameters or {}).get("session_id", ""))
            if token is not None:  # a session this run created: send its token, as a client keeps it
                case.query = {**(case.query or {}), "token": token}
                for header in ("Authorization", "X-Session-Token"):  # generated credentials would take precedence
                    (case.headers or {}).pop(header, None)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": server, "timeout": 120}

        def after_call(self, response: Any, case: Any) -> None:
            seen.append((case.operation.label, response.status_code))
            if case.operation.label == "POST /api/sessions" and response.status_code == 201:
                created = response.json()
                tokens[created["session_id"]] = created["token"]
            session_id = (case.path_parameters or {}).get("session_id")
            if case.operation.label.endswith("/face") and response.status_code == 202 and session_id not in ready:
                wait_until_ready(server, session_id, case.query["token"])  # once a session: later picks get 409s
                ready.add(session_id)

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            case.validate_response(response, checks=STATEFUL_CHECKS, transport_kwargs=kwargs)
            if "{session_id}" in case.path and response.status_code < 400 and case.method == "GET":
                refused_without_the_token(case)

    def refused_without_the_token(case: Any) -> None:
        """A session route that answered its token answers 404 without it or with another (as an unknown id)."""
        url = f"{server}{case.formatted_path}"
        for params in ({}, {"token": "not-the-token"}):
            answer = httpx.get(url, params=params, timeout=60)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "unknown_session", (url, answer.text)
        unauthorised.append(case.operation.label)

    for name in dir(base):  # the session routes are reached only through the links (a random id is a plain 404)
        if name.startswith("RANDOM__") and name != "RANDOM__POST_api_sessions":
            setattr(Workflow, name, None)
    started = time.monotonic()
    Workflow.run(settings=hypothesis.settings(_settings(STATEFUL_SCENARIOS), stateful_step_count=5))
    elapsed = time.monotonic() - started
    calls = {f"{label} → {status}": seen.count((label, status)) for label, status in sorted(set(seen))}
    print(f"schemathesis stateful: {len(seen)} calls in {elapsed:.0f} s:\n" + json.dumps(calls, indent=1))
    assert ("POST /api/sessions", 201) in seen
    assert ("POST /api/sessions/{session_id}/face", 202) in seen
    # the link reaches finalize; whether the prepare was done by then (200) or not (409 not_ready) is up to
    # schemathesis' own randomness, so only the link is required (the stateless run finalizes a prepared session)
    assert any(label == "POST /api/sessions/{session_id}/finalize" for label, _ in seen)
    assert unauthorised


def test_websocket_messages_match_the_asyncapi_document(server: str, photo: bytes) -> None:
    created = httpx.post(f"{server}/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
    session_id, token = created["session_id"], created["token"]
    schemas = {kind: shape.schema() for kind, shape in responses.SERVER_EVENTS.items()}
    events: list[dict[str, Any]] = []
    frames = []
    url = server.replace("http://", "ws://") + f"/api/sessions/{session_id}/ws?token={token}"
    with websockets.sync.client.connect(url) as socket:

        def until(kind: str) -> dict[str, Any]:
            for _ in range(2000):
                message = socket.recv(timeout=READY_TIMEOUT)
                if isinstance(message, bytes):
                    frames.append(decode_frame(message))
                    continue
                event = json.loads(message)
                events.append(event)
                if event["type"] == kind:
                    return event
            raise AssertionError(f"no {kind} event")

        until("state")
        assert httpx.post(f"{server}/api/sessions/{session_id}/face", json={"index": 0}, params={"token": token},
                          timeout=30).status_code == 202
        until("ready")
        name = httpx.get(f"{server}/api/directions").json()["directions"][0]["name"]
        socket.send(json.dumps({"seq": 1, "values": {name: 1.0}, "commit": True}))
        until("saved")
        socket.send(json.dumps({"type": "undo", "seq": 2}))
        until("sliders")
        socket.send(json.dumps({"type": "ping"}))
        until("pong")
        socket.send(json.dumps({"seq": -5, "values": {}}))
        until("error")
    kinds = {event["type"] for event in events}
    assert {"state", "ready", "saved", "sliders", "pong", "error"} <= kinds
    for event in events:
        assert event["type"] in schemas, event["type"]
        jsonschema.validate(event, schemas[event["type"]])
    kinds_of_frames = dict(FRAME_LAYOUT[1]["values"]).values()
    assert frames and all(frame.kind in kinds_of_frames for frame in frames)
