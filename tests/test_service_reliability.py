"""The service under load and faults: admission with queue places, the grace period, socket caps, durable edits, OOM."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from fluidsrv import pipeline
from fluidsrv.runtime import Runtime
from fluidsrv.session import spill
from fluidsrv.settings import Settings
from fluidsrv.web import create_app
from tests.server_support import ADMIN, SMALL_PHOTO, receive_until, small_settings

SLOW_PREPARE = {"encoder.project": {"steps": 60, "frame_every": 10}, "directions.sefa": {"k": 4}}
"""Project options that make a prepare last a few seconds on this CPU (long enough to leave and come back)."""


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return Runtime.build(small_settings(tmp_path_factory.mktemp("runtime")))


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


def serve(tmp_path: Path, runtime: Runtime, **overrides: Any) -> TestClient:
    settings = small_settings(tmp_path, **overrides)
    return TestClient(create_app(settings, runtime=runtime))


def upload(client: TestClient, photo: bytes) -> dict[str, Any]:
    response = client.post("/api/sessions", files={"file": ("photo.jpg", photo, "image/jpeg")})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def socket_url(created: dict[str, Any]) -> str:
    return f"/api/sessions/{created['session_id']}/ws?token={created['token']}"


def pick(client: TestClient, created: dict[str, Any]) -> None:
    response = client.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0},
                           headers={"Authorization": f"Bearer {created['token']}"})
    assert response.status_code == 202, response.text


def status_of(client: TestClient, created: dict[str, Any]) -> str:
    response = client.get(f"/api/sessions/{created['session_id']}",
                          headers={"Authorization": f"Bearer {created['token']}"})
    status: str = response.json()["status"]
    return status


def wait_for_status(client: TestClient, created: dict[str, Any], wanted: set[str], timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := status_of(client, created)) not in wanted:
        assert time.monotonic() < deadline, f"still {status!r}, wanted one of {wanted}"
        time.sleep(0.05)
    return status


@pytest.fixture
def client(tmp_path: Path, runtime: Runtime) -> Iterator[TestClient]:
    with serve(tmp_path, runtime, max_concurrent_prepares=1, plugin_options=SLOW_PREPARE) as test_client:
        yield test_client


def test_a_second_prepare_waits_in_line_and_hears_its_place(client: TestClient, photo: bytes) -> None:
    first, second = upload(client, photo), upload(client, photo)
    with client.websocket_connect(socket_url(first)) as one, client.websocket_connect(socket_url(second)) as two:
        receive_until(one, "state")
        receive_until(two, "state")
        pick(client, first)
        receive_until(one, "progress")  # the first is running
        pick(client, second)
        queued, _ = receive_until(two, "progress")
        assert queued["stage"] == "queued" and queued["queued"] == 1 and "line" in queued["message"]
        assert client.get(f"/api/sessions/{second['session_id']}",
                          headers={"Authorization": f"Bearer {second['token']}"}).json()["progress"]["queued"] == 1
        receive_until(one, "ready")
        # the second starts once the first is done: its next progress is a real step, no longer queued
        started, _ = receive_until(two, "progress")
        assert started["stage"] != "queued" and "queued" not in started
        receive_until(two, "ready")


def test_a_reload_during_prepare_resumes_the_same_job(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo)
    with client.websocket_connect(socket_url(created)) as socket:
        receive_until(socket, "state")
        pick(client, created)
        receive_until(socket, "progress")
    # the tab reloads: the socket is gone for a moment, the job goes on
    time.sleep(0.3)
    assert status_of(client, created) == "preparing"
    with client.websocket_connect(socket_url(created)) as socket:
        state = json.loads(socket.receive_text())
        if state["status"] != "ready":
            receive_until(socket, "ready")
    assert status_of(client, created) == "ready"
    service = client.app.state.service  # type: ignore[attr-defined]
    assert created["session_id"] not in service._abandon_timers  # no stale timer waits to cancel the next job


def test_a_job_nobody_comes_back_for_is_cancelled_after_the_grace_period(
        tmp_path: Path, runtime: Runtime, photo: bytes) -> None:
    with serve(tmp_path, runtime, prepare_grace_seconds=0.3, plugin_options=SLOW_PREPARE) as client:
        created = upload(client, photo)
        with client.websocket_connect(socket_url(created)) as socket:
            receive_until(socket, "state")
            pick(client, created)
            receive_until(socket, "progress")
        assert wait_for_status(client, created, {"cancelled", "ready"}, timeout=60) == "cancelled"


def test_a_job_that_ends_within_the_grace_period_leaves_no_timer_for_the_next(
        tmp_path: Path, runtime: Runtime, photo: bytes) -> None:
    with serve(tmp_path, runtime, prepare_grace_seconds=600) as client:
        created = upload(client, photo)
        with client.websocket_connect(socket_url(created)) as socket:
            receive_until(socket, "state")
            pick(client, created)
            receive_until(socket, "progress")
        wait_for_status(client, created, {"ready"})  # it ran on alone, well within the grace period
        service = client.app.state.service  # type: ignore[attr-defined]
        assert created["session_id"] not in service._abandon_timers
        finalized = client.post(f"/api/sessions/{created['session_id']}/finalize",
                                headers={"Authorization": f"Bearer {created['token']}"})
        assert finalized.status_code == 200, finalized.text


def test_a_session_refuses_sockets_beyond_its_cap(tmp_path: Path, runtime: Runtime, photo: bytes) -> None:
    with serve(tmp_path, runtime, max_sockets_per_session=2) as client:
        created = upload(client, photo)
        with client.websocket_connect(socket_url(created)) as one, client.websocket_connect(socket_url(created)) as two:
            receive_until(one, "state")
            receive_until(two, "state")
            with client.websocket_connect(socket_url(created)) as three:
                refused = json.loads(three.receive_text())
                assert refused["type"] == "error" and refused["code"] == "too_many_sockets"
                assert three.receive()["code"] == 4429
        with client.websocket_connect(socket_url(created)) as again:  # the places are given back on close
            assert json.loads(again.receive_text())["type"] == "state"


def test_an_out_of_memory_preview_evicts_idle_sessions_and_retries(
        tmp_path: Path, runtime: Runtime, photo: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(tmp_path, runtime) as client:
        idle = upload(client, photo)  # an idle session whose memory the recovery may take
        created = upload(client, photo)
        pick(client, created)
        service = client.app.state.service  # type: ignore[attr-defined]
        real_render, failures = pipeline.render_preview, []

        def render_once_out_of_memory(renderer: Any, ws: torch.Tensor, side: int) -> Any:
            if not failures:
                failures.append(1)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_render(renderer, ws, side)

        with client.websocket_connect(socket_url(created)) as socket:
            if json.loads(socket.receive_text())["status"] != "ready":
                receive_until(socket, "ready")
            monkeypatch.setattr(pipeline, "render_preview", render_once_out_of_memory)
            name = client.get("/api/directions").json()["directions"][0]["name"]
            socket.send_text(json.dumps({"seq": 7, "values": {name: 1.5}}))
            while (message := socket.receive()).get("bytes") is None:
                assert "error" not in (message.get("text") or ""), message
        assert failures == [1]
        stats = client.get("/api/stats", headers=ADMIN).json()
        assert stats["executor"]["oom_recoveries"] == 1
        assert not service.store.is_in_memory(idle["session_id"])  # spilled to make room
        assert status_of(client, idle) == "uploaded"  # ... and it comes back on the next request


def test_committed_edits_are_on_disk_before_they_are_acknowledged(
        tmp_path: Path, runtime: Runtime, photo: bytes) -> None:
    with serve(tmp_path, runtime) as client:
        created = upload(client, photo)
        pick(client, created)
        name = client.get("/api/directions").json()["directions"][0]["name"]
        with client.websocket_connect(socket_url(created)) as socket:
            if json.loads(socket.receive_text())["status"] != "ready":
                receive_until(socket, "ready")
            socket.send_text(json.dumps({"seq": 1, "values": {name: 2.0}, "commit": True}))
            saved, _ = receive_until(socket, "saved")
            assert saved["seq"] == 1
            # what the store has on disk now is what a restarted server would read
            store = client.app.state.service.store  # type: ignore[attr-defined]
            record = store._storage.read_edit(created["session_id"])
            edit = spill.decode_edit(record, device=torch.device("cpu"), history_limit=100)
            assert edit.sliders == edit.history.committed == {name: 2.0}


def test_settings_refuse_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="MAX_CONCURRENT_PREPARES"):
        Settings(max_concurrent_prepares=0)
    with pytest.raises(ValueError, match="LONG_JOB_SHARE"):
        Settings(long_job_share=1.0)
