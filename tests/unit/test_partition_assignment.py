"""Partition assignment between processes through leases in a real SQLite store: the share of each,
the handover when one joins (only after its consumer finished) and the takeover when one stops or
dies. Each "process" is a PartitionAssignment with its own holder and stop event; consumers are
stand-ins that record what they were asked to do."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.partitions import PartitionAssignment, partition_holders
from state import Store
from tests.integration.harness import wait_until

PARTITIONS = 8
TTL = 1.0


class Consumer:
    """Stands in for a partition's consumer thread: alive until cancelled or handed over (and then
    only once the test lets it finish the messages in hand)."""

    def __init__(self, cancel: threading.Event, finish: threading.Event) -> None:
        self.cancel, self.finish = cancel, finish
        self.handed_over = threading.Event()

    def hand_over(self) -> None:
        self.handed_over.set()

    def is_alive(self) -> bool:
        if self.cancel.is_set():
            return False
        return not (self.handed_over.is_set() and self.finish.is_set())

    def join(self, timeout: float | None = None) -> None:
        return


class Process:
    def __init__(self, store: Store, name: str) -> None:
        self.stop = threading.Event()
        self.finish = threading.Event()
        self.consumers: dict[int, Consumer] = {}
        self.assignment = PartitionAssignment(
            store, "erp", PARTITIONS, self._start, self.stop, holder=name, ttl=TTL, interval=0.05
        )

    def _start(self, partition: int, cancel: threading.Event) -> Consumer:
        self.consumers[partition] = Consumer(cancel, self.finish)
        return self.consumers[partition]

    def __enter__(self) -> Process:
        self.assignment.__enter__()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.assignment.__exit__(None, None, None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        yield store


def test_a_joining_process_gets_half_once_the_first_finished_the_messages_in_hand(store: Store) -> None:
    with Process(store, "a") as a:
        wait_until(lambda: partition_holders(store, "erp") == dict.fromkeys(range(8), "a"), 10, "a holds all")
        with Process(store, "b"):
            wait_until(lambda: all(a.consumers[p].handed_over.is_set() for p in range(4, 8)), 10, "handover")
            # Until its consumers finished, a keeps the leases and b takes nothing.
            assert partition_holders(store, "erp") == dict.fromkeys(range(8), "a")
            assert not any(a.consumers[p].handed_over.is_set() for p in range(4))
            a.finish.set()
            split = {**dict.fromkeys(range(4), "a"), **dict.fromkeys(range(4, 8), "b")}
            wait_until(lambda: partition_holders(store, "erp") == split, 10, "four each")
            assert a.assignment.held == [0, 1, 2, 3]
        # b drained: its leases are given up at once and a takes them back.
        wait_until(lambda: partition_holders(store, "erp") == dict.fromkeys(range(8), "a"), 10, "a again")


def test_a_process_that_died_loses_its_partitions_when_its_leases_run_out(store: Store) -> None:
    # A process that was killed: its heartbeat and partition leases stay until they run out.
    for partition in range(8):
        assert store.claim_lease("partition:erp", str(partition), "dead", TTL)
    assert store.claim_lease("members:erp", "dead", "dead", TTL)
    with Process(store, "b") as b:
        # While the dead process's leases last, b (sharing with it) takes nothing.
        assert partition_holders(store, "erp") == dict.fromkeys(range(8), "dead")
        wait_until(lambda: partition_holders(store, "erp") == dict.fromkeys(range(8), "b"), 10, "takeover")
        assert sorted(b.consumers) == list(range(8))
