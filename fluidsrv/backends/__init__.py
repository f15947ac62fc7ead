"""Where the stages run and where sessions are stored: local (one box) and ray (Ray Serve, PostgreSQL + S3)."""

from __future__ import annotations

from fluidsrv.backends.local_storage import LocalStorage
from fluidsrv.backends.storage import SessionStorage
from fluidsrv.settings import Settings


def open_storage(settings: Settings) -> SessionStorage:
    """The session storage the settings name: PostgreSQL + S3 when a database is set, else files in data_dir."""
    if not settings.database_url:
        return LocalStorage(settings.data_dir)
    from fluidsrv.backends.cloud_storage import CloudStorage

    return CloudStorage(settings.database_url, settings.s3_endpoint, settings.s3_bucket,
                        access_key=settings.s3_access_key or None, secret_key=settings.s3_secret_key or None,
                        region=settings.s3_region)
