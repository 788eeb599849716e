"""Which partitions of a target each `router run` process consumes: shared about evenly, by leases.

Every process delivering to a target announces itself with a heartbeat lease (scope
``members:<target>``, name: the process) and holds a lease per partition it consumes (scope
``partition:<target>``, name: the partition number), both renewed in the background
(:class:`state.leases.HeldLease`). Every second each process looks at the live members and takes
up to its share, ceil(partitions / members), of the partitions no live process holds, lowest first.
A process holding more than its share (a new one appeared) hands the extras over, highest first: their
consumer is cancelled, the messages in hand are delivered and acknowledged, and only then is the lease
given up. A drained process gives its leases up at once; a crashed one holds them until they expire
(``ttl``), then the others take them over. Single-active-consumer on the queues stays as the safety net
for order: a partition's new holder is only served once the old holder's consumer is gone.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from router.consumer import run_reconnecting
from state import HeldLease, Store

log = logging.getLogger(__name__)

ASSIGNMENT_TTL = 10.0
"""Seconds a process's hold on a partition (and its heartbeat) lasts unless renewed: how long the
partitions of a process that crashed wait before the others take them over."""
REBALANCE_INTERVAL = 1.0
JOIN_TIMEOUT = 60.0


def members_scope(target: str) -> str:
    return f"members:{target}"


def partitions_scope(target: str) -> str:
    return f"partition:{target}"


def partition_holders(store: Store, target: str) -> dict[int, str]:
    """Partition -> the process holding it now, for the partitions some live process holds."""
    return {int(name): holder for name, holder in store.live_leases(partitions_scope(target)).items()}


class PartitionRunner(Protocol):
    """What consumes one held partition (a thread): it stops by itself when the lease's ``cancel`` is
    set, or after finishing the messages in hand when handed over."""

    def hand_over(self) -> None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...


StartPartition = Callable[[int, threading.Event], PartitionRunner]
"""Start consuming a partition; the event is set when the hold is lost or the process drains."""
ConsumePartition = Callable[[int, threading.Event, threading.Event], None]
"""One broker session on a partition: ``(partition, cancel, handover)``; returns when either is set
(on a handover, once the messages in hand are done) and raises when the broker goes away."""


class PartitionConsumer:
    """The :class:`PartitionRunner` thread of one held partition of a target: runs ``consume`` sessions,
    reconnecting when the broker goes away, until cancelled or handed over."""

    def __init__(
        self, target: str, partition: int, consume: ConsumePartition, cancel: threading.Event
    ) -> None:
        self.target = target
        self.partition = partition
        self._consume = consume
        self._cancel = cancel
        self._handover = threading.Event()
        self._ended = threading.Event()
        """Set once the handover is done: the messages in hand were delivered and the consumer closed."""
        self._thread = threading.Thread(target=self._run, name=f"deliver-{target}-{partition}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        name = f"delivery of {self.target} partition {self.partition}"
        run_reconnecting(name, self._session, self._cancel, until=self._ended.is_set)

    def _session(self) -> None:
        self._consume(self.partition, self._cancel, self._handover)
        if self._handover.is_set():
            self._ended.set()

    def hand_over(self) -> None:
        """Finish the messages in hand, then stop: another process is to take the partition."""
        self._handover.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


@dataclass
class _Held:
    lease: HeldLease
    runner: PartitionRunner
    handing_over: bool = False


class PartitionAssignment:
    """This process's share of a target's partitions, kept balanced with the other live processes by a
    background thread while used as a context manager."""

    def __init__(
        self,
        store: Store,
        target: str,
        partitions: int,
        start: StartPartition,
        stop: threading.Event,
        *,
        holder: str,
        ttl: float = ASSIGNMENT_TTL,
        interval: float = REBALANCE_INTERVAL,
    ) -> None:
        self._store = store
        self.target = target
        self.partitions = partitions
        self._start = start
        self._stop = stop
        self.holder = holder
        self._ttl = ttl
        self._interval = interval
        self._member: HeldLease | None = None
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"assign-{target}", daemon=True)

    @property
    def held(self) -> list[int]:
        """The partitions this process consumes now (including any being handed over)."""
        with self._lock:
            return sorted(self._held)

    def __enter__(self) -> PartitionAssignment:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.rebalance()
                except Exception as error:  # the store may be away; held leases last until their ttl
                    log.warning("partitions of %s not rebalanced: %s", self.target, error)
                self._stop.wait(self._interval)
        finally:
            self._let_go()

    def rebalance(self) -> None:
        """Forget partitions whose consumer ended, then take or hand over partitions towards this
        process's share."""
        self._reap()
        if self._member is None or not self._member.held:
            if self._member is not None:
                self._member.release()
            scope = members_scope(self.target)
            self._member = HeldLease.take(
                self._store, scope, self.holder, self.holder, self._ttl, stop=self._stop
            )
            if self._member is None:
                return
        members = self._store.live_leases(members_scope(self.target))
        share = math.ceil(self.partitions / max(len(members), 1))
        with self._lock:
            keeping = sorted(p for p, held in self._held.items() if not held.handing_over)
        if len(keeping) > share:
            for partition in keeping[share:]:
                self._hand_over(partition)
            return
        wanted = share - len(keeping)
        taken = partition_holders(self._store, self.target)
        for partition in range(self.partitions):
            if wanted == 0 or self._stop.is_set():
                return
            if partition in taken or partition in self._held:
                continue
            if self._take(partition):
                wanted -= 1

    def _take(self, partition: int) -> bool:
        scope = partitions_scope(self.target)
        lease = HeldLease.take(self._store, scope, str(partition), self.holder, self._ttl, stop=self._stop)
        if lease is None:
            return False
        runner = self._start(partition, lease.cancel)
        with self._lock:
            self._held[partition] = _Held(lease, runner)
        log.info("took partition %d of %s", partition, self.target, extra={"target": self.target})
        return True

    def _hand_over(self, partition: int) -> None:
        with self._lock:
            held = self._held[partition]
            held.handing_over = True
        held.runner.hand_over()
        log.info(
            "handing partition %d of %s over to another process",
            partition,
            self.target,
            extra={"target": self.target},
        )

    def _reap(self) -> None:
        """Give up the leases of partitions whose consumer ended (handed over, or its lease was lost)."""
        with self._lock:
            ended = [p for p, held in self._held.items() if not held.runner.is_alive()]
            done = [self._held.pop(p) for p in ended]
        for held in done:
            held.lease.release()

    def _let_go(self) -> None:
        """On the drain: wait for every partition consumer to finish, then give up every lease."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
        for item in held:
            item.runner.join(JOIN_TIMEOUT)
            item.lease.release()
        if self._member is not None:
            self._member.release()
