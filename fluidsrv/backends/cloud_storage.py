"""Session storage for the scale-out backend: ``meta`` parts and edit records in PostgreSQL, ``arrays`` and
``tensors`` in S3-compatible object storage, shared by every process of a cluster.

A write puts the two large parts under a fresh *generation* (``{prefix}sessions/{id}/{generation}/arrays``),
then points the session's row at it in one transaction, then deletes the generation it replaced. A reader
follows the row it selected to that one generation's objects; when they vanish under it (a newer write replaced
them) it selects the row again, so it never returns a mix. Writes and removals of one session hold a
transaction-scoped advisory lock on its id, so each replaced generation is deleted by the write that replaced it.

Objects of a write cut short before its commit are left behind: :meth:`CloudStorage.remove` deletes everything
under the session's prefix, and :meth:`CloudStorage.scan` reports a session that has objects but no row, once
they are older than ``orphan_grace_s``, as an incomplete entry (which the store then removes).
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import psycopg
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from fluidsrv.backends.storage import StorageUnavailableError, StoredSession

SESSIONS_TABLE = "fluidsrv_sessions"
EDITS_TABLE = "fluidsrv_edits"
LARGE_PARTS = ("arrays", "tensors")
READ_ATTEMPTS = 10
"""How often a read follows a session's row to a generation that a concurrent write replaced, before giving up."""
_SCHEMA_LOCK = (0x666C7569, 0x64737276)  # advisory lock (two-int key space) around CREATE TABLE, across processes
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE} (id text PRIMARY KEY, meta bytea NOT NULL, generation text NOT NULL,"
    " parts_bytes bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
    f"CREATE TABLE IF NOT EXISTS {EDITS_TABLE} (id text PRIMARY KEY, revision bigint NOT NULL, record bytea NOT NULL,"
    " updated_at timestamptz NOT NULL DEFAULT now())",
)
_LOCK_SESSION = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
T = TypeVar("T")
Connection = psycopg.Connection[Any]
_boto_lock = threading.Lock()
_boto_session: list[Any] = []  # one boto3 session for every client: it loads the S3 service model once


def _s3_client(**options: Any) -> Any:
    """A new S3 client (boto3 clients are thread safe; creating them from one session is not, hence the lock)."""
    with _boto_lock:
        if not _boto_session:
            _boto_session.append(boto3.session.Session())
        return _boto_session[0].client("s3", **options)


class CloudStorage:
    """:class:`~fluidsrv.backends.storage.SessionStorage` in PostgreSQL (small records) and S3 (large parts)."""

    def __init__(self, database_url: str, s3_endpoint: str, bucket: str, *, access_key: str | None = None,
                 secret_key: str | None = None, region: str = "us-east-1", prefix: str = "fluidsrv/",
                 max_connections: int = 8, orphan_grace_s: float = 900.0, connect_timeout_s: int = 5) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.orphan_grace_s = orphan_grace_s
        self._closed = False
        self._close_lock = threading.Lock()
        self._password = ""
        try:
            params = conninfo.conninfo_to_dict(database_url)
        except psycopg.Error:
            raise StorageUnavailableError("the PostgreSQL URL cannot be parsed") from None
        self._password = str(params.get("password") or "")
        self._pg_where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        netloc = urlsplit(s3_endpoint).netloc.rpartition("@")[2]
        self._s3_where = netloc or (s3_endpoint if s3_endpoint else f"AWS S3 ({region})")
        self._s3 = _s3_client(
            endpoint_url=s3_endpoint or None, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=Config(
                connect_timeout=connect_timeout_s, read_timeout=60, max_pool_connections=2 * max_connections,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"} if s3_endpoint else None))
        self._io = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="fluidsrv-s3")  # parts at once
        try:
            self._create_tables(database_url, connect_timeout_s)
            self._ensure_bucket(region)
            self._pool: ConnectionPool[Connection] = ConnectionPool(
                database_url, min_size=1, max_size=max_connections, open=False, name="fluidsrv-storage",
                kwargs={"connect_timeout": connect_timeout_s}, check=ConnectionPool.check_connection,
                timeout=2.0 * connect_timeout_s, num_workers=1)
            try:
                self._pool.open(wait=True, timeout=2.0 * connect_timeout_s)
            except PoolTimeout as error:
                self._pool.close()
                raise StorageUnavailableError(f"cannot connect to PostgreSQL at {self._pg_where}") from error
        except BaseException:
            self._io.shutdown()
            self._s3.close()
            raise

    # ---- the SessionStorage protocol ----------------------------------------------------------------------

    def write(self, session_id: str, parts: StoredSession) -> None:
        """Put the large parts under a fresh generation, point the session's row at it, delete the one it replaced."""
        base = self._session_prefix(session_id)
        generation = uuid.uuid4().hex
        list(self._io.map(lambda part: self._put(f"{base}{generation}/{part}", getattr(parts, part)), LARGE_PARTS))

        def commit(conn: Connection) -> str | None:
            conn.execute(_LOCK_SESSION, (session_id,))
            row = conn.execute(f"SELECT generation FROM {SESSIONS_TABLE} WHERE id = %s", (session_id,)).fetchone()
            conn.execute(
                f"INSERT INTO {SESSIONS_TABLE} (id, meta, generation, parts_bytes, updated_at)"
                " VALUES (%s, %s, %s, %s, now()) ON CONFLICT (id) DO UPDATE SET meta = EXCLUDED.meta,"
                " generation = EXCLUDED.generation, parts_bytes = EXCLUDED.parts_bytes, updated_at = now()",
                (session_id, parts.meta, generation, len(parts.arrays) + len(parts.tensors)))
            return None if row is None else str(row[0])

        replaced = self._sql(commit)
        if replaced is not None and replaced != generation:  # equal only when a retried commit had gone through
            self._delete_keys([f"{base}{replaced}/{part}" for part in LARGE_PARTS])

    def read(self, session_id: str) -> StoredSession | None:
        """The parts of the generation the session's row names (None without a row, or when its objects are gone)."""
        found = self._follow(session_id, load=True)
        if found is None or found[1] is None:
            return None
        meta, (arrays, tensors) = found[0], found[1]
        return StoredSession(meta=meta, arrays=arrays, tensors=tensors)

    def scan(self) -> Iterator[tuple[str, bytes | None]]:
        """Every session with a row (meta None when its objects are missing) and every old orphan (meta None)."""
        rows = self._sql(lambda conn: conn.execute(f"SELECT id, meta, generation FROM {SESSIONS_TABLE}").fetchall())
        listed, newest = self._list_objects()
        for session_id, meta, generation in rows:
            if listed.get(session_id, {}).get(generation, set()).issuperset(LARGE_PARTS):
                yield session_id, bytes(meta)
                continue
            found = self._follow(session_id, load=False)  # listed before a write replaced its generation?
            if found is not None:
                yield session_id, found[0] if found[1] is not None else None
        now = time.time()
        for session_id in listed.keys() - {row[0] for row in rows}:
            if now - newest[session_id] < self.orphan_grace_s:
                continue  # possibly a first write in progress in another process
            found = self._follow(session_id, load=False)
            yield session_id, None if found is None or found[1] is None else found[0]

    def remove(self, session_id: str) -> None:
        """Delete the session's row and edit record, then every object under its prefix."""
        base = self._session_prefix(session_id)

        def delete(conn: Connection) -> None:
            conn.execute(_LOCK_SESSION, (session_id,))
            conn.execute(f"DELETE FROM {SESSIONS_TABLE} WHERE id = %s", (session_id,))
            conn.execute(f"DELETE FROM {EDITS_TABLE} WHERE id = %s", (session_id,))

        self._sql(delete)
        keys: list[str] = []
        for page in self._s3_call("list", lambda: list(
                self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base))):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        self._delete_keys(keys)

    def write_edit(self, session_id: str, revision: int, record: bytes) -> None:
        """Store the edit record unless a higher revision is stored (one upsert, committed on return)."""
        self._sql(lambda conn: conn.execute(
            f"INSERT INTO {EDITS_TABLE} AS stored (id, revision, record, updated_at) VALUES (%s, %s, %s, now())"
            " ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision, record = EXCLUDED.record,"
            " updated_at = now() WHERE stored.revision <= EXCLUDED.revision", (session_id, revision, record)))

    def read_edit(self, session_id: str) -> bytes | None:
        """The stored edit record, or None."""
        row = self._sql(lambda conn: conn.execute(
            f"SELECT record FROM {EDITS_TABLE} WHERE id = %s", (session_id,)).fetchone())
        return None if row is None else bytes(row[0])

    def edit_owners(self) -> Iterator[str]:
        """The session ids with an edit record."""
        rows = self._sql(lambda conn: conn.execute(f"SELECT id FROM {EDITS_TABLE}").fetchall())
        yield from (str(row[0]) for row in rows)

    def volume(self) -> int:
        """The bytes of all sessions' parts, from the sizes their rows record (one query, no listing)."""
        if self._closed:
            return 0
        row = self._sql(lambda conn: conn.execute(
            f"SELECT COALESCE(SUM(octet_length(meta) + parts_bytes), 0) FROM {SESSIONS_TABLE}").fetchone())
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        """Close the connection pool and the S3 client (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()
        self._io.shutdown()
        self._s3.close()

    # ---- PostgreSQL -----------------------------------------------------------------------------------------

    def _create_tables(self, database_url: str, connect_timeout_s: int) -> None:
        try:
            with psycopg.connect(database_url, connect_timeout=connect_timeout_s) as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _SCHEMA_LOCK)
                for statement in _SCHEMA:
                    conn.execute(statement)
        except psycopg.Error as error:
            raise StorageUnavailableError(
                f"cannot connect to PostgreSQL at {self._pg_where}: {self._scrub(error)}") from None

    def _sql(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one transaction on a pooled connection; a dropped connection is replaced once."""
        if self._closed:
            raise RuntimeError("the session storage is closed")
        for attempt in (1, 2):
            try:
                with self._pool.connection() as conn:  # commits when work returns, rolls back when it raises
                    return work(conn)
            except PoolTimeout as error:
                raise StorageUnavailableError(f"no connection to PostgreSQL at {self._pg_where}") from error
            except psycopg.OperationalError as error:  # a dropped connection, a server restart, a deadlock
                if attempt == 2:
                    raise StorageUnavailableError(
                        f"PostgreSQL at {self._pg_where} failed: {self._scrub(error)}") from None
        raise AssertionError("unreachable")

    def _scrub(self, error: BaseException) -> str:
        """The first line of an error's message, never holding the password."""
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return message.replace(self._password, "***") if self._password else message

    def _follow(self, session_id: str, load: bool) -> tuple[bytes, tuple[bytes, bytes] | None] | None:
        """The row's meta and its generation's large parts (empty unless ``load``; None when gone); None: no row."""
        missed = None
        for _ in range(READ_ATTEMPTS):
            row = self._sql(lambda conn: conn.execute(
                f"SELECT meta, generation FROM {SESSIONS_TABLE} WHERE id = %s", (session_id,)).fetchone())
            if row is None:
                return None
            meta, generation = bytes(row[0]), str(row[1])
            if generation == missed:
                return meta, None  # its objects are gone for good (a removal cut in before the write's commit)
            keys = [f"{self._session_prefix(session_id)}{generation}/{part}" for part in LARGE_PARTS]
            arrays, tensors = self._io.map(functools.partial(self._get, load=load), keys)
            if arrays is not None and tensors is not None:
                return meta, (arrays, tensors)
            missed = generation  # replaced by a concurrent write? select the row again
        raise StorageUnavailableError(f"session {session_id} was rewritten {READ_ATTEMPTS} times while being read")

    # ---- S3 ---------------------------------------------------------------------------------------------------

    def _session_prefix(self, session_id: str) -> str:
        if not session_id or "/" in session_id:
            raise ValueError(f"invalid session id {session_id!r}")
        return f"{self.prefix}sessions/{session_id}/"

    def _s3_call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _MISSING:
                raise
            raise StorageUnavailableError(f"S3 at {self._s3_where} refused to {what}: {error}") from error
        except BotoCoreError as error:
            raise StorageUnavailableError(f"S3 at {self._s3_where} failed to {what}: {error}") from error

    def _ensure_bucket(self, region: str) -> None:
        try:
            self._s3_call(f"open bucket {self.bucket}", lambda: self._s3.head_bucket(Bucket=self.bucket))
            return
        except ClientError:
            pass  # missing: create it
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            self._s3_call(f"create bucket {self.bucket}", lambda: self._s3.create_bucket(Bucket=self.bucket, **extra))
        except StorageUnavailableError as error:
            cause = error.__cause__
            if not (isinstance(cause, ClientError)
                    and cause.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou"):
                raise  # (created meanwhile by another process: fine)

    def _put(self, key: str, body: bytes) -> None:
        self._s3_call(f"put {key}", lambda: self._s3.put_object(Bucket=self.bucket, Key=key, Body=body))

    def _get(self, key: str, load: bool) -> bytes | None:
        """The object's bytes (b"" when only checked for, ``load`` False), or None when it does not exist."""
        try:
            if not load:
                self._s3_call(f"check {key}", lambda: self._s3.head_object(Bucket=self.bucket, Key=key))
                return b""
            body: bytes = self._s3_call(
                f"get {key}", lambda: self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            return body
        except ClientError:
            return None

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            answer = self._s3_call("delete objects", functools.partial(
                self._s3.delete_objects, Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageUnavailableError(f"S3 at {self._s3_where} failed to delete {first.get('Key')}: "
                                              f"{first.get('Code')} {first.get('Message')}")

    def _list_objects(self) -> tuple[dict[str, dict[str, set[str]]], dict[str, float]]:
        """Per session id under the prefix: {generation: part names}, and its newest object's time (epoch s)."""
        base = f"{self.prefix}sessions/"
        listed: dict[str, dict[str, set[str]]] = {}
        newest: dict[str, float] = {}
        pages = self._s3_call("list", lambda: list(
            self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)))
        for page in pages:
            for item in page.get("Contents", []):
                session_id, _, rest = str(item["Key"]).removeprefix(base).partition("/")
                generation, _, part = rest.partition("/")
                listed.setdefault(session_id, {}).setdefault(generation, set()).add(part)
                newest[session_id] = max(newest.get(session_id, 0.0), item["LastModified"].timestamp())
        return listed, newest
