"""Shared fixtures: the real RabbitMQ and PostgreSQL services, and unique broker namespaces.

In CI (CI=true) a test that needs RabbitMQ or PostgreSQL fails when the service is absent; on a
developer machine it is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from state import Store, normalize_store_url
from tests.rabbit_cluster import ClusterUnavailable, RabbitCluster

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip locally, fail in CI, when a service the test needs is not listening."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI must provide it)")
    pytest.skip(message)


class BrokerLock:
    """Keeps a test that stops the shared RabbitMQ apart from everything else using it while tests run side
    by side (pytest-xdist workers, background queue sweeps): each user holds a shared lock on one file of
    the run, and the stopping test an exclusive one."""

    def __init__(self, path: Path) -> None:
        self._handle = path.open("a")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        fcntl.flock(self._handle, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Within ``shared``: wait until nothing else uses the broker, and keep all else off until the end."""
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._handle, fcntl.LOCK_SH)

    def close(self) -> None:
        self._handle.close()


@pytest.fixture(scope="session")
def rabbitmq_lock_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's broker lock file: xdist workers share their base temp's parent, a plain run has its own."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "rabbitmq.lock"


@pytest.fixture(scope="session")
def rabbitmq_lock(rabbitmq_lock_path: Path) -> Iterator[BrokerLock]:
    """This process's handle on the run's broker lock."""
    lock = BrokerLock(rabbitmq_lock_path)
    yield lock
    lock.close()


@pytest.fixture
def rabbitmq_url(rabbitmq_lock: BrokerLock) -> Iterator[str]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    with rabbitmq_lock.shared():
        yield RABBITMQ_URL


@pytest.fixture
def restartable_rabbitmq(rabbitmq_url: str, rabbitmq_lock: BrokerLock) -> Iterator[None]:
    """The test may stop the broker's app; no other test uses the broker meanwhile, and it is started
    again whatever happens."""
    with rabbitmq_lock.exclusive():
        try:
            yield
        finally:
            subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=120, check=False)
            subprocess.run(["rabbitmqctl", "await_startup"], capture_output=True, timeout=120, check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the shared RabbitMQ run first: under xdist (``--dist loadfile``) the other worker
    starts with the cluster tests' file, which does not use that broker, so neither waits."""
    items.sort(key=lambda item: "restartable_rabbitmq" not in getattr(item, "fixturenames", ()))


def delete_queues(url: str, prefix: str) -> None:
    """Delete the queues named ``<prefix>.…`` and the exchange ``prefix`` on the broker at ``url``."""
    from kombu import Connection

    listing = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    names = [line.strip() for line in listing.stdout.splitlines() if line.strip().startswith(f"{prefix}.")]
    with Connection(url) as connection:
        for name in names:
            channel = connection.channel()
            channel.queue_delete(name)
            channel.close()
        channel = connection.channel()
        channel.exchange_delete(prefix)
        channel.close()


class QueueSweeper:
    """Deletes each finished test's queues in a background thread (rabbitmqctl takes a second or more to
    list them), so the next test need not wait; the session waits for every sweep and fails if one did."""

    def __init__(self, lock_path: Path) -> None:
        self._lock_path = lock_path
        self._threads: list[threading.Thread] = []
        self.failures: list[str] = []

    def sweep(self, url: str, prefix: str) -> None:
        thread = threading.Thread(target=self._delete, args=(url, prefix), name=f"sweep {prefix}")
        thread.start()
        self._threads.append(thread)

    def _delete(self, url: str, prefix: str) -> None:
        lock = BrokerLock(self._lock_path)
        try:
            with lock.shared():
                delete_queues(url, prefix)
        except Exception as error:
            self.failures.append(f"deleting the queues of {prefix}: {error!r}")
        finally:
            lock.close()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()


@pytest.fixture(scope="session")
def queue_sweeper(rabbitmq_lock_path: Path) -> Iterator[QueueSweeper]:
    sweeper = QueueSweeper(rabbitmq_lock_path)
    yield sweeper
    sweeper.join()
    assert not sweeper.failures, "\n".join(sweeper.failures)


@pytest.fixture
def postgres_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture
def broker_prefix() -> str:
    """A queue-name prefix no other test or run uses, so tests can share one RabbitMQ vhost."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rabbitmq_namespace(rabbitmq_url: str, broker_prefix: str, queue_sweeper: QueueSweeper) -> Iterator[str]:
    """A unique queue prefix on the real RabbitMQ; its queues and exchange are deleted afterwards."""
    yield broker_prefix
    queue_sweeper.sweep(rabbitmq_url, broker_prefix)


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes clustered on this machine for the failover module, removed after its last
    test rather than at the end of the session, so they idle through none of the other tests."""
    cluster = RabbitCluster()
    try:
        cluster.start()
    except ClusterUnavailable as error:
        cluster.stop()
        message = f"the three-node RabbitMQ cluster did not start: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI must be able to start it)")
        pytest.skip(message)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (a router process stores there); dropped afterwards."""
    import psycopg

    name = f"router_{uuid.uuid4().hex[:12]}"
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class StoreLocation:
    """Where a test's store lives: a URL and, on PostgreSQL, the throwaway schema."""

    url: str
    schema: str | None = None

    def open(self) -> Store:
        return Store(self.url, schema=self.schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreLocation]:
    """A fresh database per test: a SQLite file, or a random PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield StoreLocation(f"sqlite:///{tmp_path / 'state' / 'router-state.db'}")
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"test_store_{uuid.uuid4().hex[:12]}"
    yield StoreLocation(url, schema)
    engine = create_engine(normalize_store_url(url))
    try:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()
