"""fluidsrv.client against a real loopback server: the whole edit flow, sync and async, and the typed refusals."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluidsrv.cli import main
from fluidsrv.client import (
    AsyncClient,
    AsyncSession,
    BadRequestError,
    Client,
    Frame,
    NoFaceError,
    NotFoundError,
    NotReadyError,
    Progress,
    TokenError,
    UnknownSessionError,
    UnsupportedMediaError,
)
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import (
    ADMIN_TOKEN,
    SMALL_PHOTO,
    LiveServer,
    free_port,
    gradient_image,
    png_bytes,
    small_settings,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    fast = {"encoder.project": {"steps": 3, "wplus_steps": 3, "frame_every": 1}, "directions.sefa": {"k": 4}}
    settings = small_settings(tmp_path_factory.mktemp("client"), finetune_steps=1, plugin_options=fast)
    with LiveServer(create_app(settings, runtime=Runtime.build(settings))) as host:
        yield f"http://{host}"


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


def pixels(frame: Frame) -> np.ndarray:
    with Image.open(io.BytesIO(frame.image)) as image:
        return np.asarray(image.convert("RGB"))


def test_the_whole_edit_flow_through_the_async_client(server: str, photo: bytes) -> None:
    async def flow() -> None:
        async with AsyncClient(server) as client:
            session = await client.create_session(photo, "portrait.jpg")
            assert session.faces and session.state.status == "uploaded" and session.state.filename == "portrait.jpg"
            first, second = [direction.name for direction in (await client.directions())[:2]]
            steps: list[Progress] = []
            async with session.connect() as live:  # open before the pick: every step of the job arrives here
                await session.pick_face(0)
                images: list[Frame] = []
                ready = await live.wait_ready(on_progress=steps.append, on_image=images.append)
                assert ready.ready and ready.face_index == 0
                assert steps and steps[0].stage == "align" and len({step.stage for step in steps}) >= 3, steps
                assert all(0 <= step.step <= step.total for step in steps if step.total)
                assert images and all(image.kind == "progress" and image.latency is None for image in images)

                frame0 = await live.preview({first: 0.0}, commit=True)
                states = [{first: 1.0}, {first: 2.0}, {first: 3.0, second: -2.0}]
                frames = [frame async for frame in live.sliders(states, commit=True)]
                seqs = [frame.seq for frame in frames]
                assert seqs == sorted(seqs) and seqs[-1] == frame0.seq + len(states)  # the last state's frame
                assert all(frame.kind == "preview" and frame.latency is not None and frame.latency > 0
                           for frame in [frame0, *frames])
                shown0, shown1 = pixels(frame0), pixels(frames[-1])
                assert shown0.shape == (256, 256, 3) and np.abs(shown0.astype(int) - shown1.astype(int)).mean() > 1.0

                undone = await live.undo()
                assert undone.changed and undone.values == {first: 0.0} and undone.can_redo
                assert undone.frame is not None and np.array_equal(pixels(undone.frame), shown0)
                redone = await live.redo()
                assert redone.values == {first: 3.0, second: -2.0} and not redone.can_redo
                assert redone.frame is not None and np.array_equal(pixels(redone.frame), shown1)
                with pytest.raises(BadRequestError) as unknown:
                    await live.preview({"no-such-slider": 1.0})
                assert unknown.value.code == "unknown_slider" and unknown.value.seq is not None

                # slide while the session finalizes: the job's progress comes among the socket's other messages
                finalize_steps: list[Progress] = []
                finalizing = asyncio.ensure_future(session.finalize(on_progress=finalize_steps.append))

                async def until_finalized() -> AsyncIterator[dict[str, float]]:
                    yield {first: 3.0, second: -2.0}
                    await finalizing
                    yield {first: 3.0, second: -2.0}

                others: list[object] = []
                assert [frame async for frame in live.sliders(until_finalized(), on_event=others.append)]
                assert any(isinstance(other, Progress) and other.stage == "finalize" for other in others), others
            finalized = finalizing.result()
            assert finalized.result and finalized.sliders == {first: 3.0, second: -2.0}
            assert {step.stage for step in finalize_steps} == {"finalize"}
            jpeg = await session.result()
            with Image.open(io.BytesIO(jpeg)) as result, Image.open(io.BytesIO(photo)) as original:
                assert result.format == "JPEG" and result.size == original.size
            assert await session.original() == photo
            await session.delete()
            with pytest.raises(UnknownSessionError):
                await session.refresh()

    asyncio.run(flow())


def test_the_sync_client_prepares_slides_and_finalizes(server: str, photo: bytes) -> None:
    with Client(server, admin_token=ADMIN_TOKEN) as client:
        session = client.create_session(photo)
        steps: list[Progress] = []
        assert session.prepare(0, on_progress=steps.append).ready
        slider = client.directions()[0].name
        frames = list(session.sliders([{slider: value} for value in (-1.0, 1.0, 2.0)], commit=True))
        assert frames and frames[-1].seq == 3 and all(frame.image_format == "webp" for frame in frames)
        assert session.refresh().sliders == {slider: 2.0} and session.state.can_undo
        assert session.undo().raw["changed"] is True and session.redo().sliders == {slider: 2.0}
        assert client.stats()["sessions"]["in_memory"] >= 1
        again = client.session(session.session_id, session.token)  # a session reopened by id and token
        assert again.state.status == "ready" and again.finalize().result
        with Image.open(io.BytesIO(again.result())) as result:
            assert result.format == "JPEG"
        with session.connect() as live:
            assert live.state.ready and live.ping() > 0


def test_refusals_are_typed(server: str, photo: bytes) -> None:
    with Client(server) as client:
        with pytest.raises(NoFaceError) as no_face:
            client.create_session(png_bytes(gradient_image()))
        assert (no_face.value.status, no_face.value.code) == (422, "no_face") and no_face.value.message
        with pytest.raises(UnsupportedMediaError) as garbage:
            client.create_session(b"this is not an image at all")
        assert (garbage.value.status, garbage.value.code) == (415, "unsupported_type")

        session = client.create_session(photo)
        with pytest.raises(BadRequestError) as bad_index:
            session.pick_face(99)
        assert bad_index.value.code == "bad_face_index"
        with pytest.raises(NotReadyError):
            session.finalize()
        with pytest.raises(NotReadyError):
            session.wait_ready()  # no face picked: nothing to wait for
        with pytest.raises(NotFoundError) as no_result:
            session.result()
        assert no_result.value.code == "no_result"
        with pytest.raises(TokenError) as admin:
            client.stats()  # this client has no admin token
        assert admin.value.status == 401

        # a wrong token is answered exactly like an unknown session, over REST and over the websocket
        for session_id, token in ((session.session_id, "wrong"), ("0" * 32, session.token)):
            with pytest.raises(UnknownSessionError) as unknown:
                client.session(session_id, token)
            assert (unknown.value.status, unknown.value.code) == (404, "unknown_session")
        with pytest.raises(UnknownSessionError):
            asyncio.run(open_socket(server, session.session_id, "wrong"))


async def open_socket(server: str, session_id: str, token: str) -> None:
    async with AsyncClient(server) as client, AsyncSession(client, session_id, token, None).connect():
        pass


def test_fluidsrv_edit_drives_a_server(server: str, shared_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    photo = shared_dir / "photos" / SMALL_PHOTO
    with Client(server, admin_token=ADMIN_TOKEN) as client:
        slider = client.directions()[0]
        before = client.stats()["sessions"]["in_memory"]
        out = tmp_path / "edited.jpg"
        assert main(["edit", str(photo), "--server", server, "--slider", f"{slider.label}=1.5", "-o", str(out)]) == 0
        printed = capsys.readouterr()
        assert f"sliders {slider.name}=+1.5" in printed.out and server in printed.out
        assert "finetune" in printed.err and "finalize" in printed.err  # the job's progress, drawn on stderr
        with Image.open(out) as result, Image.open(photo) as original:
            assert result.format == "JPEG" and result.size == original.size

        assert main(["edit", str(photo), "--server", server, "--list-faces", "--list-sliders"]) == 0
        listed = capsys.readouterr().out
        assert "1 face(s)" in listed and "#0  box" in listed and slider.name in listed

        refusals = [
            (["--slider", "no-such=1", "-o", str(out)], "unknown slider 'no-such'"),
            (["--slider", f"{slider.name}=99", "-o", str(out)], "goes from"),
            (["--face", "3", "-o", str(out)], "--face 3"),
            (["--device", "cpu", "-o", str(out)], "with --server the server's own settings"),
        ]
        for extra, message in refusals:
            assert main(["edit", str(photo), "--server", server, *extra]) == 2
            assert message in capsys.readouterr().err
        no_face = tmp_path / "gradient.png"
        no_face.write_bytes(png_bytes(gradient_image()))
        assert main(["edit", str(no_face), "--server", server, "-o", str(out)]) == 2
        assert "no face" in capsys.readouterr().err.lower()
        assert client.stats()["sessions"]["in_memory"] == before  # every session it made was deleted again
    assert main(["edit", str(photo), "--server", f"http://127.0.0.1:{free_port()}", "-o", str(out)]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_the_readme_example_runs(server: str, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Example client (Python)\n"):]
    source = re.search(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert source is not None and "from fluidsrv.client import" in source.group(1)
    photo = shared_dir / "photos" / SMALL_PHOTO
    code = source.group(1).replace('"http://127.0.0.1:8000"', repr(server)).replace('"photo.jpg"', repr(str(photo)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md example client", "exec"), {"__name__": "readme_example"})
    assert re.search(r"^frame 21: \d+ ms$", capsys.readouterr().out, flags=re.MULTILINE)
    with Image.open(tmp_path / "edited.jpg") as result, Image.open(photo) as original:
        assert result.format == "JPEG" and result.size == original.size


def test_the_client_imports_only_the_wire_format_from_the_package() -> None:
    from tests.test_architecture import import_graph

    graph = import_graph()
    client = {name for name in graph if name == "fluidsrv.client" or name.startswith("fluidsrv.client.")}
    leaks = {name: sorted(graph[name] - client - {"fluidsrv.protocol", "fluidsrv.errors"}) for name in client}
    assert client and not any(leaks.values()), leaks


def test_error_codes_map_to_their_families() -> None:
    from fluidsrv.client import BusyError, ClientError, RateLimitedError, ServerError, TooLargeError
    from fluidsrv.client.errors import error_for, error_from_body

    assert type(error_for("upload_too_large", "big", 413)) is TooLargeError
    assert type(error_for("too_many_sockets", "full", seq=None)) is RateLimitedError
    busy = error_for("superseded", "newer", seq=7)  # a websocket event: no HTTP status, its family's
    assert type(busy) is BusyError and (busy.status, busy.seq) == (409, 7)
    assert type(error_for("some_new_code", "?", 404)) is NotFoundError  # an unknown code: by its status
    assert type(error_for("some_new_code", "?", 503)) is ServerError
    assert type(error_for("some_new_code", "?")) is BadRequestError
    plain = error_from_body(502, "<html>bad gateway</html>")  # a proxy's answer, not the server's JSON
    assert isinstance(plain, ServerError) and isinstance(plain, ClientError) and plain.status == 502
