"""Leases in the store (table ``leases``): work only one process may do at a time, claimed, renewed and
freed by name, and ``HeldLease``, which keeps one alive with a heartbeat thread while its work runs.

A lease names work only one process may do at a time (releasing a parked key, polling a REST route).
It is taken for ``ttl`` seconds and renewed every ``ttl / 3`` while the work runs, so long work keeps it
and a crashed holder loses it within ``ttl``. A renewal only extends a lease that is still ours and not
expired; when one fails, or no renewal succeeded within ``ttl`` (the store was away), the lease is lost:
``cancel`` is set and ``held`` turns False, and the work must stop before doing anything more, since
another process may already have taken it over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from types import TracebackType
from uuid import uuid4

from sqlalchemy import delete, select, update

from state.engine import StoreEngine, rows_changed
from state.tables import LeaseRow

log = logging.getLogger(__name__)

RENEWALS_PER_TTL = 3
# How often the heartbeat looks at the owner's stop event between renewals: the bound on how late
# ``cancel`` follows a drain.
STOP_CHECK_SECONDS = 0.25


def lease_holder() -> str:
    """Who this process is when it holds a lease: host, process id and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"


class LeaseStore(StoreEngine):
    """Named leases (``scope``/``name``): who holds each, until when."""

    def claim_lease(self, scope: str, name: str, holder: str, ttl: float) -> bool:
        """Take (or renew) lease ``scope``/``name`` for ``ttl`` seconds; False while another holder has it."""
        now = datetime.now(UTC)
        statement = self._insert(LeaseRow).values(
            scope=scope, name=name, holder=holder, expires_at=now + timedelta(seconds=ttl)
        )
        statement = statement.on_conflict_do_update(
            index_elements=[LeaseRow.scope, LeaseRow.name],
            set_={"holder": statement.excluded.holder, "expires_at": statement.excluded.expires_at},
            where=(LeaseRow.holder == holder) | (LeaseRow.expires_at < now),
        )
        with self._transaction() as session:
            session.execute(statement)
            current = session.scalar(
                select(LeaseRow.holder).where(LeaseRow.scope == scope, LeaseRow.name == name)
            )
            return current == holder

    def renew_lease(self, scope: str, name: str, holder: str, ttl: float) -> bool:
        """Extend lease ``scope``/``name`` by ``ttl`` seconds from now, only while ``holder`` has it and it
        has not expired; False when it was lost (another holder may have taken it since)."""
        now = datetime.now(UTC)
        statement = (
            update(LeaseRow)
            .where(
                LeaseRow.scope == scope,
                LeaseRow.name == name,
                LeaseRow.holder == holder,
                LeaseRow.expires_at >= now,
            )
            .values(expires_at=now + timedelta(seconds=ttl))
        )
        with self._transaction() as session:
            return rows_changed(session.execute(statement)) == 1

    def live_leases(self, scope: str) -> dict[str, str]:
        """The unexpired leases of ``scope``: name -> holder."""
        now = datetime.now(UTC)
        with self._transaction() as session:
            rows = session.execute(
                select(LeaseRow.name, LeaseRow.holder).where(
                    LeaseRow.scope == scope, LeaseRow.expires_at >= now
                )
            )
            return {name: holder for name, holder in rows}

    def free_lease(self, scope: str, name: str, holder: str) -> None:
        """Give up a lease (only if still ours)."""
        with self._transaction() as session:
            session.execute(
                delete(LeaseRow).where(
                    LeaseRow.scope == scope, LeaseRow.name == name, LeaseRow.holder == holder
                )
            )


class HeldLease:
    """A lease this process holds, renewed in the background until :meth:`release`.

    ``cancel`` is set when the lease is lost or when the owner's ``stop`` is set: pass it as the stop
    event of the work done under the lease, so retry waits end at once.
    """

    def __init__(
        self, store: LeaseStore, scope: str, name: str, holder: str, ttl: float, stop: threading.Event | None
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"lease {scope}/{name}: ttl must be a positive number of seconds, got {ttl!r}")
        self._store = store
        self.scope, self.name, self.holder, self.ttl = scope, name, holder, ttl
        self._stop = stop
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._valid_until = 0.0
        self._thread = threading.Thread(target=self._beat, name=f"lease-{scope}-{name}", daemon=True)

    @classmethod
    def take(
        cls,
        store: LeaseStore,
        scope: str,
        name: str,
        holder: str,
        ttl: float,
        *,
        stop: threading.Event | None = None,
    ) -> HeldLease | None:
        """Take lease ``scope``/``name`` and start renewing it; None while another holder has it."""
        lease = cls(store, scope, name, holder, ttl, stop)
        started = time.monotonic()
        if not store.claim_lease(scope, name, holder, ttl):
            return None
        lease._valid_until = started + ttl
        lease._thread.start()
        return lease

    @property
    def held(self) -> bool:
        """True while the lease is ours and the work may go on (not lost, not cancelled, not expired)."""
        return not self.cancel.is_set() and time.monotonic() < self._valid_until

    def _beat(self) -> None:
        interval = self.ttl / RENEWALS_PER_TTL
        next_renewal = time.monotonic() + interval
        while not self._done.wait(min(STOP_CHECK_SECONDS, interval)):
            if self._stop is not None and self._stop.is_set():
                self.cancel.set()
            if time.monotonic() < next_renewal:
                continue
            self._renew()
            if self.lost.is_set():
                return
            next_renewal = time.monotonic() + interval

    def _renew(self) -> None:
        started = time.monotonic()
        try:
            renewed = self._store.renew_lease(self.scope, self.name, self.holder, self.ttl)
        except Exception as error:  # the store may be away for a moment; the lease lasts until its ttl
            if time.monotonic() < self._valid_until:
                log.warning("lease %s/%s not renewed yet: %s", self.scope, self.name, error)
                return
            renewed = False
        if renewed:
            self._valid_until = started + self.ttl
            return
        log.warning(
            "lease %s/%s lost (expired or taken by another process); its work stops", self.scope, self.name
        )
        self.lost.set()
        self.cancel.set()

    def release(self) -> None:
        """Stop renewing and give the lease up if it is still ours (a lost one belongs to another)."""
        self._done.set()
        self.cancel.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.lost.is_set():
            with contextlib.suppress(Exception):  # the lease runs out by itself if the store is away
                self._store.free_lease(self.scope, self.name, self.holder)

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
