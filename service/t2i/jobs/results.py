"""Where a job's images are kept: one small interface, and the database behind it by default.

The store (store.py) calls a ResultStore inside its own transactions: `put` in the very
transaction that charges the job and marks it succeeded (so the charge and the images are
recorded together), `delete` in the one that expires or deletes them. `DatabaseResults` keeps
the bytes in the billing database's `job_images` table, which every replica reaches, so any
replica serves any job's images and the embedded SQLite default needs nothing more.

Another backend (an object store, say) implements the same three calls: it writes its objects
in `put` before the transaction commits (a rolled-back job leaves orphans for its sweeper, never
a charged job without images) and ignores `conn` where it has no use for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import Connection, delete, insert, select

from ..billing.schema import job_images


class ResultStore(Protocol):
    def put(self, conn: Connection, job_id: str, images: Sequence[bytes]) -> None:
        """Keep the job's images, numbered from 0, as part of `conn`'s transaction."""

    def get(self, conn: Connection, job_id: str, position: int) -> bytes | None:
        """One image's bytes, or None when there is no such image (any more)."""

    def delete(self, conn: Connection, job_ids: Sequence[str]) -> None:
        """Forget the images of these jobs."""


class DatabaseResults:
    """Images as rows of `job_images`, in the billing database."""

    def put(self, conn: Connection, job_id: str, images: Sequence[bytes]) -> None:
        if images:
            conn.execute(insert(job_images), [
                {"job_id": job_id, "position": position, "data": data} for position, data in enumerate(images)
            ])

    def get(self, conn: Connection, job_id: str, position: int) -> bytes | None:
        return conn.execute(select(job_images.c.data).where(
            job_images.c.job_id == job_id, job_images.c.position == position)).scalar_one_or_none()

    def delete(self, conn: Connection, job_ids: Sequence[str]) -> None:
        if job_ids:
            conn.execute(delete(job_images).where(job_images.c.job_id.in_(list(job_ids))))
