"""Leases that hold while their work runs, on a real SQLite file and the real PostgreSQL: two holders,
work that outlasts the ttl, and a holder that crashes (a child process killed with SIGKILL)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from state import HeldLease, Store
from tests.conftest import StoreLocation
from tests.integration.harness import wait_until

TTL = 1.0
SCOPE = "release:erp"


def _never_taken(store: Store, holder: str, seconds: float) -> list[float]:
    """Try to take the lease every 50 ms for ``seconds``; the moments (since start) it was taken."""
    started = time.monotonic()
    taken = []
    while time.monotonic() - started < seconds:
        if store.claim_lease(SCOPE, "A", holder, TTL):
            taken.append(time.monotonic() - started)
        time.sleep(0.05)
    return taken


def test_a_renewed_lease_outlasts_its_ttl_and_the_other_holder_waits(location: StoreLocation) -> None:
    with location.open() as first, location.open() as second:
        lease = HeldLease.take(first, SCOPE, "A", "host-1", TTL)
        assert lease is not None
        with lease:
            taken = _never_taken(second, "host-2", 3 * TTL)  # work three times as long as the ttl
            assert lease.held and not lease.lost.is_set()
        assert taken == []
        assert second.claim_lease(SCOPE, "A", "host-2", TTL)  # given up when the work ended


def test_a_holder_that_lost_its_lease_is_told_to_stop(location: StoreLocation) -> None:
    with location.open() as first, location.open() as second:
        lease = HeldLease.take(first, SCOPE, "A", "host-1", TTL)
        assert lease is not None
        with lease:
            first.free_lease(SCOPE, "A", "host-1")  # as if it had run out while the store was away
            assert second.claim_lease(SCOPE, "A", "host-2", TTL)
            wait_until(lambda: lease.cancel.is_set(), 3 * TTL, "the first holder told it lost the lease")
            assert lease.lost.is_set() and not lease.held
        assert not first.claim_lease(SCOPE, "A", "host-1", TTL)  # the first holder did not free it


HOLDER = textwrap.dedent(
    """
    import sys, time
    from state import HeldLease
    from state import Store
    store = Store(sys.argv[1], schema=sys.argv[2] or None)
    lease = HeldLease.take(store, "release:erp", "A", "crashing-host", float(sys.argv[3]))
    print("held" if lease is not None else "refused", flush=True)
    time.sleep(120)
    """
)


def test_a_crashed_holder_loses_the_key_within_the_ttl(location: StoreLocation) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, location.url, location.schema or "", str(TTL)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with location.open() as second:
            assert _never_taken(second, "host-2", 3 * TTL) == []  # the live child keeps renewing
            child.kill()  # a crash: no drain, no free
            child.wait(30)
            crashed = time.monotonic()
            wait_until(lambda: second.claim_lease(SCOPE, "A", "host-2", TTL), 3 * TTL, "the key taken over")
            assert time.monotonic() - crashed <= TTL + 0.5
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
