"""``fluidsrv edit PHOTO --slider NAME=VALUE ... -o OUT.jpg``: edit a face of a photo without the browser.

The command runs the browser app's use cases through the same :class:`~fluidsrv.service.EditService`, with no
HTTP in between: the photo is uploaded into a session, the chosen face is prepared (align → encode → fine-tune),
the sliders are set and the edit is finalized into a JPEG of the photo's size. The job's progress goes to stderr.
Sessions live in a temporary folder that is removed when the command ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from fluidsrv.cli import CliError
from fluidsrv.cli.faces import read_photo_bytes

if TYPE_CHECKING:
    from fluidsrv.client import AsyncSession, Face
    from fluidsrv.service import EditService, Event, Session
    from fluidsrv.settings import Settings

JPEG_SUFFIXES = (".jpg", ".jpeg")
REDRAW_SECONDS = 0.1  # a terminal's progress line is redrawn at most this often
BAR_WIDTH = 24

EXAMPLES = """\
examples:
  fluidsrv edit photo.jpg --slider age=2 --slider Smile=1.5 -o older.jpg
  fluidsrv edit group.jpg --list-faces
  fluidsrv edit group.jpg --face 1 --list-sliders
  FLUIDSRV_GENERATOR=random:32 FLUIDSRV_ENCODER=project fluidsrv edit photo.jpg --slider "SeFa coarse 1=-2" -o out.jpg
  fluidsrv edit photo.jpg --server http://gpu-box:8000 --slider age=2 -o older.jpg
"""


class Slider(Protocol):
    """What the checks and listings read of a slider: a direction of the service or of the client."""

    @property
    def name(self) -> str:
        """The slider's id."""
    @property
    def label(self) -> str:
        """What a person sees."""
    @property
    def group(self) -> str:
        """The UI group."""
    @property
    def slider_range(self) -> tuple[float, float]:
        """(min, max)."""


class JobStep(Protocol):
    """A job's step as the progress line draws it: the service's ``JobProgress`` or the client's ``Progress``."""

    @property
    def stage(self) -> str:
        """The job's stage."""
    @property
    def step(self) -> int:
        """The step reached."""
    @property
    def total(self) -> int:
        """The stage's steps."""
    @property
    def message(self) -> str:
        """What happened."""


def register(subparsers: Any) -> None:
    """Add the ``edit`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "edit",
        help="edit a face of a photo with sliders and write the result as a JPEG",
        description="Upload PHOTO, prepare one of its faces (align, encode, fine-tune), move the sliders given\n"
        "with --slider and write the finalized photo, at its own size, as a JPEG. Runs the server's editing\n"
        "service in this process (no HTTP): the models and plugins come from the same FLUIDSRV_* settings;\n"
        "with --server URL, a running fluidsrv server does the work (over HTTP and its websocket).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("photo", type=Path, help="the photo (JPEG, PNG, WebP, ...)")
    parser.add_argument("-o", "--out", type=Path, metavar="OUT.jpg", help="write the edited photo here (a JPEG)")
    parser.add_argument("--face", type=int, default=0, metavar="N", help="which face, left to right from 0 (default 0)")
    parser.add_argument(
        "--slider",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="move a slider, by its name or its label (case-insensitive), e.g. --slider age=2 (repeatable); "
        "the value must lie in the slider's range",
    )
    parser.add_argument("--list-faces", action="store_true", help="print the faces found, left to right, and stop")
    parser.add_argument("--list-sliders", action="store_true", help="print the sliders with their ranges, and stop")
    parser.add_argument("--device", help='"auto", "cpu" or a CUDA device such as "cuda:0"')
    parser.add_argument("--generator", help='"embedded", "random:RES" or a path to a generator checkpoint')
    parser.add_argument("--detector", help="detector plugin (default: settings, i.e. $FLUIDSRV_DETECTOR or dlib)")
    parser.add_argument("--server", metavar="URL",
                        help="drive the fluidsrv server at URL (e.g. http://127.0.0.1:8000) instead of loading the "
                        "models here; its own settings choose the models and plugins")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then upload → prepare → set the sliders → finalize, and write the JPEG."""
    from fluidsrv.settings import Settings

    requests = parse_sliders(args.slider)
    listing = args.list_faces or args.list_sliders
    if args.out is None and not listing:
        raise CliError("say where to write the result with -o OUT.jpg (or use --list-faces / --list-sliders)")
    if args.out is not None:
        check_output(args.out)
    if args.face < 0:
        raise CliError(f"--face must be 0 or more, got {args.face}")
    data = read_photo_bytes(args.photo)
    if args.server:
        return edit_on_server(args, data, requests)
    settings = Settings.from_env(generator=args.generator, device=args.device, detector=args.detector)
    check_generator(settings)
    with tempfile.TemporaryDirectory(prefix="fluidsrv-edit-") as data_dir:
        # a local file: no upload limit; sessions go to a folder that disappears with the command
        local = dataclasses.replace(settings, data_dir=Path(data_dir),
                                    max_upload_bytes=max(settings.max_upload_bytes, len(data)))
        try:
            return asyncio.run(edit_photo(args, local, data, requests))
        except KeyboardInterrupt:
            print("fluidsrv: interrupted", file=sys.stderr)
            return 130


# ---------------------------------------------------------------------------------------------- checks


def parse_sliders(pairs: Sequence[str]) -> dict[str, float]:
    """Return ``NAME=VALUE`` strings as {name: value}, or raise CliError for a malformed pair."""
    requests: dict[str, float] = {}
    for pair in pairs:
        name, separator, raw = pair.rpartition("=")
        name = name.strip()
        if not separator or not name:
            raise CliError(f"--slider wants NAME=VALUE, got {pair!r}")
        try:
            value = float(raw)
        except ValueError:
            raise CliError(f"--slider {pair!r}: {raw.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise CliError(f"--slider {pair!r}: the value must be a finite number")
        if name.casefold() in {known.casefold() for known in requests}:
            raise CliError(f"--slider {name!r} is given twice")
        requests[name] = value
    return requests


def check_output(path: Path) -> None:
    """Raise CliError unless ``path`` names a JPEG file in an existing folder."""
    if path.suffix.lower() not in JPEG_SUFFIXES:
        raise CliError(f"-o {path}: the result is a JPEG; give a name ending in .jpg or .jpeg")
    if path.is_dir():
        raise CliError(f"-o {path} is a folder; give a file name such as {path / 'edited.jpg'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CliError(f"-o {path}: the folder {folder} does not exist")


def check_generator(settings: Settings) -> None:
    """Raise CliError when the configured generator is a checkpoint path that does not exist."""
    spec = settings.generator
    if spec == "embedded" or spec.startswith("random:"):
        return
    if not Path(spec).expanduser().is_file():
        raise CliError(f"generator {spec} does not exist (pass --generator embedded, random:RES or a checkpoint)")


def edit_on_server(args: argparse.Namespace, data: bytes, requests: dict[str, float]) -> int:
    """Run the edit on the server at ``--server`` (the local model flags do not apply there)."""
    local_only = [flag for flag in ("device", "generator", "detector") if getattr(args, flag)]
    if local_only:
        raise CliError(f"--{local_only[0]} chooses the models of a local edit; with --server the server's own "
                       "settings choose them")
    try:
        return asyncio.run(edit_remotely(args, data, requests))
    except KeyboardInterrupt:
        print("fluidsrv: interrupted", file=sys.stderr)
        return 130


def resolve_sliders(requests: Mapping[str, float], directions: Mapping[str, Slider]) -> dict[str, float]:
    """Map each requested NAME (a direction's name or label, case-insensitive) to its direction's name.

    Raises CliError for an unknown or ambiguous name (listing the sliders) and for a value outside the range.
    """
    values: dict[str, float] = {}
    for requested, value in requests.items():
        direction = find_direction(requested, directions)
        low, high = direction.slider_range
        if not low <= value <= high:
            raise CliError(f"--slider {requested}={value:g}: {describe_slider_name(direction)} goes from "
                           f"{low:g} to {high:g}")
        if direction.name in values:
            raise CliError(f"--slider {requested}: {describe_slider_name(direction)} is given twice")
        values[direction.name] = value
    return values


def find_direction(requested: str, directions: Mapping[str, Slider]) -> Slider:
    """The direction whose name, else whose label, equals ``requested`` case-insensitively; CliError otherwise."""
    key = requested.casefold()
    by_name = [direction for direction in directions.values() if direction.name.casefold() == key]
    if len(by_name) == 1:
        return by_name[0]
    by_label = [direction for direction in directions.values() if direction.label.casefold() == key]
    if len(by_label) == 1:
        return by_label[0]
    if by_name or by_label:
        names = ", ".join(direction.name for direction in by_name or by_label)
        raise CliError(f"--slider {requested!r} is ambiguous ({names}); use one of those names")
    available = ", ".join(describe_slider_name(direction) for direction in directions.values()) or "none"
    raise CliError(f"unknown slider {requested!r}; available sliders: {available}")


def describe_slider_name(direction: Slider) -> str:
    """``label (name)``, or just the name when the label is the same."""
    if direction.label.casefold() == direction.name.casefold():
        return direction.name
    return f"{direction.label} ({direction.name})"


def check_face_index(index: int, count: int, photo: Path) -> None:
    """Raise CliError when the photo has no face number ``index``, saying how many faces (``count``) it has."""
    if not 0 <= index < count:
        numbering = "face 0" if count == 1 else f"faces 0 to {count - 1}, left to right"
        raise CliError(f"--face {index}: {photo.name} has {count} face(s) ({numbering}; --list-faces shows them)")


# ---------------------------------------------------------------------------------------------- the edit


async def edit_photo(args: argparse.Namespace, settings: Settings, data: bytes, requests: dict[str, float]) -> int:
    """Upload, list or prepare → slide → finalize through one EditService, and write the result."""
    from fluidsrv.errors import UserError

    service = await start_service(settings)
    try:
        try:
            session, token = await service.create(data, args.photo.name)
        except UserError as error:
            raise CliError(f"{args.photo}: {error.message}") from None
        directions = service.session_directions(session)
        if args.list_faces:
            print_faces(session, args.photo)
        if args.list_sliders:
            print_sliders(directions)
        if args.list_faces or args.list_sliders:
            return 0
        values = resolve_sliders(requests, directions)
        check_face_index(args.face, len(session.faces), args.photo)
        jpeg = await prepare_and_finalize(service, session, args.face, values)
        write_result(args.out, jpeg)
        height, width = session.upload.pixels.shape[:2]
        print(f"wrote {args.out} ({width}x{height}, face {args.face}, {describe_values(values)})")
        await service.delete(session, token)
        return 0
    finally:
        await service.close()


async def start_service(settings: Settings) -> EditService:
    """Load the models and plugins of ``settings`` into an EditService, or raise CliError saying why not."""
    from fluidsrv.plugins import PluginError
    from fluidsrv.service import EditService

    try:
        return await EditService.start(settings)
    except (PluginError, OSError, ValueError) as error:
        raise CliError(f"cannot load the models: {error}") from None


async def prepare_and_finalize(service: EditService, session: Session, face: int, values: dict[str, float]) -> bytes:
    """Prepare ``face`` of the session, set the slider ``values`` and return the finalized JPEG (progress on stderr)."""
    from fluidsrv.errors import UserError
    from fluidsrv.service import Status

    progress = JobProgressLine()
    unsubscribe = service.subscribe(session.id, progress.on_event)
    try:
        try:
            await service.prepare(session, face)
            await service.wait(session)
            if session.status != Status.READY:
                raise CliError(f"preparing face {face} failed: {session.error or session.status}")
            service.set_sliders(session, values, commit=True)
            return await service.finalize(session)
        except UserError as error:
            raise CliError(error.message) from None
    finally:
        unsubscribe()
        progress.close()


def write_result(path: Path, jpeg: bytes) -> None:
    """Write the JPEG bytes to ``path`` or raise CliError."""
    try:
        path.write_bytes(jpeg)
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from None


def describe_values(values: Mapping[str, float]) -> str:
    """``sliders a=+1, b=-2`` (or ``no sliders moved``) for the summary line."""
    if not values:
        return "no sliders moved"
    return "sliders " + ", ".join(f"{name}={value:+g}" for name, value in values.items())


def print_faces(session: Session, photo: Path) -> None:
    """Print the faces of the session, numbered left to right as ``--face`` takes them."""
    from fluidsrv.cli.faces import describe_face

    height, width = session.upload.pixels.shape[:2]
    print(f"{photo.name}: {width}x{height}, {len(session.faces)} face(s), numbered left to right")
    for index, face in enumerate(session.faces):
        print(f"  {describe_face(index, face)}")


def print_sliders(directions: Mapping[str, Slider]) -> None:
    """Print each slider's name, label, range and group."""
    names = max((len(direction.name) for direction in directions.values()), default=4)
    labels = max((len(direction.label) for direction in directions.values()), default=5)
    print(f"{len(directions)} slider(s), by name or label:")
    for direction in directions.values():
        low, high = direction.slider_range
        span = f"[{low:g}, {high:g}]"
        print(f"  {direction.name:<{names}}  {direction.label:<{labels}}  {span:<10}  {direction.group}".rstrip())


# ---------------------------------------------------------------------------------------------- on a server


async def edit_remotely(args: argparse.Namespace, data: bytes, requests: dict[str, float]) -> int:
    """Upload, list or prepare → slide → finalize on the server at ``args.server`` through :mod:`fluidsrv.client`,
    write the result and delete the session there."""
    from fluidsrv.client import ApiError, AsyncClient

    async with AsyncClient(args.server) as client:
        try:
            session = await client.create_session(data, args.photo.name)
        except ApiError as error:
            raise CliError(f"{args.photo}: {error.message}") from None
        try:
            return await _edit_on_server(args, session, requests)
        except ApiError as error:
            raise CliError(error.message) from None
        finally:
            with contextlib.suppress(ApiError):
                await session.delete()


async def _edit_on_server(args: argparse.Namespace, session: AsyncSession, requests: dict[str, float]) -> int:
    directions = {direction.name: direction for direction in await session.directions()}
    if args.list_faces:
        print_server_faces(session, args.photo.name)
    if args.list_sliders:
        print_sliders(directions)
    if args.list_faces or args.list_sliders:
        return 0
    values = resolve_sliders(requests, directions)
    check_face_index(args.face, len(session.faces), args.photo)
    progress = JobProgressLine()
    try:
        async with session.connect() as live:  # open first, so that every step of the prepare is drawn
            await session.pick_face(args.face)
            await live.wait_ready(on_progress=progress.update)
            if values:
                await live.preview(values, commit=True)
        await session.finalize(on_progress=progress.update)
    finally:
        progress.close()
    write_result(args.out, await session.result())
    state = session.state
    print(f"wrote {args.out} ({state.width}x{state.height}, face {args.face}, {describe_values(values)}; "
          f"on {args.server})")
    return 0


def print_server_faces(session: AsyncSession, photo_name: str) -> None:
    """Print the faces the server found, numbered left to right as ``--face`` takes them."""
    state = session.state
    print(f"{photo_name}: {state.width}x{state.height}, {len(state.faces)} face(s), numbered left to right")
    for face in state.faces:
        print(f"  {describe_server_face(face)}")


def describe_server_face(face: Face) -> str:
    """One line about a face of the server's answer: index, box, size, score."""
    x0, y0, x1, y1 = face.box
    return (f"#{face.index}  box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f})  {x1 - x0:.0f}x{y1 - y0:.0f} px"
            f"  score {face.score:.2f}  landmarks {len(face.landmarks)}")



# ---------------------------------------------------------------------------------------------- progress


class JobProgressLine:
    """The job's progress on a stream (stderr): one line redrawn in place on a terminal, plain lines otherwise.

    :class:`fluidsrv.progress_bar.ProgressBar` draws downloads (bytes, MB/s) and stays silent off a terminal;
    a job counts steps per stage, and a log file should get a line every tenth of a stage.
    """

    def __init__(self, stream: IO[str] | None = None, width: int = BAR_WIDTH) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._drawn = 0  # characters of the line on the terminal now
        self._stage: str | None = None

    def on_event(self, event: Event) -> None:
        """A service subscriber: draws the progress events of the session, ignores the others."""
        from fluidsrv.service import ProgressEvent

        if isinstance(event, ProgressEvent):
            self.update(event.progress)

    def update(self, progress: JobStep) -> None:
        """Show one step of the job (throttled on a terminal; every tenth, and each stage's last, otherwise)."""
        line = self.render(progress)
        new_stage = progress.stage != self._stage
        self._stage = progress.stage
        last = progress.step >= progress.total
        if self.interactive:
            now = time.monotonic()
            if new_stage or last or now - self._last_draw >= REDRAW_SECONDS:
                self._last_draw = now
                columns = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line cannot be redrawn
                line = line[:columns]
                self.stream.write("\r" + line.ljust(self._drawn))
                self.stream.flush()
                self._drawn = len(line)
        elif last or new_stage or progress.step % max(1, progress.total // 10) == 0:
            self.stream.write(line + "\n")
            self.stream.flush()

    def render(self, progress: JobStep) -> str:
        """``stage [####----] step/total message``."""
        fraction = min(max(progress.step / progress.total, 0.0), 1.0) if progress.total > 0 else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        message = f" {progress.message}" if progress.message else ""
        return f"{progress.stage:<9} [{bar}] {progress.step}/{progress.total}{message}"

    def close(self) -> None:
        """End the terminal's progress line (nothing to do off a terminal)."""
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0
