"""The SessionStorage guarantees, on LocalStorage and on CloudStorage against a real PostgreSQL and S3 server."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fluidsrv.backends.local_storage import LocalStorage
from fluidsrv.backends.storage import SessionStorage, StoredSession
from tests.real_servers import S3Server, free_ports, fresh_schema


def new_id() -> str:
    return uuid.uuid4().hex


def parts(tag: str, size: int = 100) -> StoredSession:
    """Three parts that all name ``tag``, the large ones padded to ``size`` bytes."""
    return StoredSession(meta=f"meta {tag}".encode(), arrays=f"arrays {tag} ".encode().ljust(size, b"a"),
                         tensors=f"tensors {tag} ".encode().ljust(size, b"t"))


@dataclass
class Backend:
    """One storage place: ``open`` gives another instance on it (as another process would have)."""

    name: str
    open: Callable[..., SessionStorage]
    break_part: Callable[[SessionStorage, str], None]  # make the session's stored entry incomplete
    objects: Callable[[str], list[str]]  # the keys stored for the session in object storage (cloud only)
    database: str = ""  # the PostgreSQL URL (cloud only)


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    """One bucket for the module's tests (SeaweedFS allocates volumes on a bucket's first write: 0.2-1 s), each
    test under a prefix of its own."""
    return s3_server.new_bucket()


@pytest.fixture(params=["local", "cloud"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[SessionStorage] = []

    def remember(storage: SessionStorage) -> SessionStorage:
        opened.append(storage)
        return storage

    if request.param == "local":
        def break_local(storage: SessionStorage, session_id: str) -> None:
            assert isinstance(storage, LocalStorage)
            storage._parts.delete(f"session/{session_id}/arrays")

        yield Backend("local", lambda **_: remember(LocalStorage(tmp_path)), break_local, lambda _: [])
    else:
        cloud_storage = pytest.importorskip("fluidsrv.backends.cloud_storage")
        database = fresh_schema(request.getfixturevalue("postgres_url"))
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("bucket")
        client, prefix = s3.client, f"{new_id()}/"

        def open_cloud(**options: Any) -> SessionStorage:
            return remember(cloud_storage.CloudStorage(database, s3.endpoint, bucket, access_key=s3.access_key,
                                                       secret_key=s3.secret_key, prefix=prefix, **options))

        def objects(session_id: str) -> list[str]:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}sessions/{session_id}/")
            return sorted(item["Key"] for item in listed.get("Contents", []))

        def break_cloud(storage: SessionStorage, session_id: str) -> None:
            arrays = [key for key in objects(session_id) if key.endswith("/arrays")]
            client.delete_object(Bucket=bucket, Key=arrays[0])

        yield Backend("cloud", open_cloud, break_cloud, objects, database)
    for storage in opened:
        storage.close()


@pytest.fixture
def storage(backend: Backend) -> SessionStorage:
    return backend.open()


def test_is_a_session_storage(storage: SessionStorage) -> None:
    assert isinstance(storage, SessionStorage)


def test_round_trip_and_missing(storage: SessionStorage) -> None:
    session_id = new_id()
    assert storage.read(session_id) is None
    assert storage.read_edit(session_id) is None
    stored = parts("one", size=300_000)
    storage.write(session_id, stored)
    assert storage.read(session_id) == stored
    assert storage.read(new_id()) is None


def test_overwrite_replaces_all_three_parts(storage: SessionStorage, backend: Backend) -> None:
    session_id = new_id()
    storage.write(session_id, parts("old", size=5000))
    storage.write(session_id, parts("new", size=50))
    assert storage.read(session_id) == parts("new", size=50)
    if backend.name == "cloud":  # only the new generation's objects are left
        keys = backend.objects(session_id)
        assert len(keys) == 2 and len({key.rsplit("/", 2)[1] for key in keys}) == 1, keys


def test_scan_lists_complete_and_incomplete_entries(storage: SessionStorage, backend: Backend) -> None:
    complete, incomplete = new_id(), new_id()
    storage.write(complete, parts("complete"))
    storage.write(incomplete, parts("incomplete"))
    backend.break_part(storage, incomplete)
    assert dict(storage.scan()) == {complete: b"meta complete", incomplete: None}
    assert storage.read(incomplete) is None


def test_remove_removes_everything(storage: SessionStorage, backend: Backend) -> None:
    session_id, other = new_id(), new_id()
    for name in (session_id, other):
        storage.write(name, parts(name))
        storage.write_edit(name, 1, b"edit")
    storage.remove(session_id)
    assert storage.read(session_id) is None
    assert storage.read_edit(session_id) is None
    assert [name for name, _ in storage.scan()] == [other]
    assert list(storage.edit_owners()) == [other]
    assert backend.objects(session_id) == []
    assert storage.read(other) == parts(other)
    storage.remove(session_id)  # again: no error
    storage.remove(new_id())


def test_write_edit_keeps_the_highest_revision(storage: SessionStorage) -> None:
    session_id = new_id()
    storage.write_edit(session_id, 5, b"five")
    storage.write_edit(session_id, 3, b"three")
    assert storage.read_edit(session_id) == b"five"
    storage.write_edit(session_id, 5, b"five again")  # the same revision replaces
    assert storage.read_edit(session_id) == b"five again"
    storage.write_edit(session_id, 9, b"nine")
    assert storage.read_edit(session_id) == b"nine"
    assert list(storage.edit_owners()) == [session_id]


def test_concurrent_writes_and_reads_never_mix(storage: SessionStorage, backend: Backend) -> None:
    """One thread rewrites a session 200 times; two readers (this instance, another one) never see a mix."""
    session_id, iterations = new_id(), 200
    storage.write(session_id, parts("0"))
    other = backend.open()
    done, start = threading.Event(), threading.Barrier(3)
    failures: list[str] = []
    reads = [0, 0]

    def write() -> None:
        try:
            start.wait()
            for i in range(1, iterations + 1):
                storage.write(session_id, parts(str(i), size=1000 + i))
                time.sleep(0.0005)  # let the readers in between writes too, not only during them
        except Exception as error:
            failures.append(f"write: {error!r}")
        finally:
            done.set()

    def read(reader: SessionStorage, slot: int) -> None:
        try:
            start.wait()
            while not done.is_set():
                got = reader.read(session_id)
                assert got is not None, "the session vanished while being rewritten"
                tag = got.meta.decode().split()[1]
                assert got == parts(tag, size=1000 + int(tag) if tag != "0" else 100), f"a mix at {tag}"
                reads[slot] += 1
                time.sleep(0.002)  # leave the (2-core) machine to the writer and the servers now and then
        except Exception as error:
            failures.append(f"read: {error!r}")
            done.set()

    threads = [threading.Thread(target=write), threading.Thread(target=read, args=(storage, 0)),
               threading.Thread(target=read, args=(other, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert min(reads) > 0, reads
    assert storage.read(session_id) == parts(str(iterations), size=1000 + iterations)
    if backend.name == "cloud":
        assert len(backend.objects(session_id)) == 2  # every replaced generation was deleted


def test_a_second_instance_sees_the_first_ones_writes(storage: SessionStorage, backend: Backend) -> None:
    other = backend.open()
    session_id = new_id()
    storage.write(session_id, parts("first"))
    assert other.read(session_id) == parts("first")
    other.write_edit(session_id, 4, b"from the other")
    assert storage.read_edit(session_id) == b"from the other"
    other.write(session_id, parts("second"))
    assert storage.read(session_id) == parts("second")
    assert dict(storage.scan()) == {session_id: b"meta second"}
    other.remove(session_id)
    assert storage.read(session_id) is None and storage.read_edit(session_id) is None


def test_volume_and_close(storage: SessionStorage, backend: Backend) -> None:
    stored = parts("v", size=4000)
    storage.write(new_id(), stored)
    volume = storage.volume()
    assert volume >= len(stored.meta) + len(stored.arrays) + len(stored.tensors)
    if backend.name == "cloud":
        assert volume == len(stored.meta) + len(stored.arrays) + len(stored.tensors)
    storage.close()
    storage.close()  # idempotent
    assert storage.volume() == 0
    with pytest.raises(RuntimeError, match="closed"):
        storage.write_edit(new_id(), 1, b"late")


# ---- CloudStorage only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cloud"], indirect=True)
def test_scan_reports_old_orphaned_objects(backend: Backend) -> None:
    """Objects of a first write cut short before its commit: incomplete once old enough, removable."""
    storage = backend.open()
    orphan = new_id()
    storage.write(orphan, parts("orphan"))
    keys = backend.objects(orphan)
    pg = pytest.importorskip("psycopg")
    with pg.connect(backend.database, autocommit=True) as conn:  # as if the commit never happened
        conn.execute("DELETE FROM fluidsrv_sessions WHERE id = %s", (orphan,))
    assert dict(storage.scan()) == {}  # within the grace period: maybe a write in progress elsewhere
    assert dict(backend.open(orphan_grace_s=0).scan()) == {orphan: None}
    storage.remove(orphan)
    assert backend.objects(orphan) == [] and len(keys) == 2


@pytest.mark.parametrize("backend", ["cloud"], indirect=True)
def test_reconnects_after_dropped_connections(backend: Backend) -> None:
    storage = backend.open()
    session_id = new_id()
    storage.write(session_id, parts("before"))
    pg = pytest.importorskip("psycopg")
    with pg.connect(backend.database, autocommit=True) as conn:
        dropped = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    assert dropped is not None and dropped[0] >= 1
    assert storage.read(session_id) == parts("before")
    storage.write_edit(session_id, 1, b"after")
    assert storage.read_edit(session_id) == b"after"


def test_unavailable_servers_are_named(postgres_url: str, s3_server: S3Server) -> None:
    cloud_storage = pytest.importorskip("fluidsrv.backends.cloud_storage")
    error_type = cloud_storage.StorageUnavailableError
    (closed,) = free_ports(1)
    keys = {"access_key": s3_server.access_key, "secret_key": s3_server.secret_key}
    bucket = s3_server.new_bucket()
    with pytest.raises(error_type, match=re.escape(f"PostgreSQL at 127.0.0.1:{closed}")) as caught:
        cloud_storage.CloudStorage(f"postgresql://fluidsrv:hunter2secret@127.0.0.1:{closed}/postgres",
                                   s3_server.endpoint, bucket, connect_timeout_s=2, **keys)
    assert "hunter2secret" not in str(caught.value)
    wrong_password = postgres_url.replace("postgresql://fluidsrv:", "postgresql://fluidsrv:hunter2secret")
    with pytest.raises(error_type, match="password authentication failed") as caught:
        cloud_storage.CloudStorage(wrong_password, s3_server.endpoint, bucket, connect_timeout_s=2, **keys)
    assert "hunter2secret" not in str(caught.value)
    with pytest.raises(error_type, match=re.escape(f"S3 at 127.0.0.1:{closed}")):
        cloud_storage.CloudStorage(postgres_url, f"http://127.0.0.1:{closed}", bucket, connect_timeout_s=2, **keys)
    with pytest.raises(error_type, match=r"S3 at .* refused"):
        cloud_storage.CloudStorage(postgres_url, s3_server.endpoint, bucket, access_key=s3_server.access_key,
                                   secret_key="wrong", connect_timeout_s=2)
