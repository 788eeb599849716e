"""``http.workers``: extra `router run --only http` processes serving the listener's port beside this one.

One Python process parses HTTP, checks signatures and JSON for every webhook under one GIL; more
processes spread that over the cores. Every process binds the same port with SO_REUSEPORT (the
kernel spreads connections over them) and runs its own grouping intake, so each 202 still follows
its own broker confirm and ledger commit. The process that started them restarts one that exits,
and stops them (SIGTERM: they drain like any `router run`) when it stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

WORKER_PORT_ENV = "ROUTER_HTTP_WORKER_PORT"
"""Set in a worker's environment: the port to share (the first process may have bound port 0)."""


def worker_port() -> int | None:
    """The port this process must share as an HTTP worker, or None when it is not one."""
    value = os.environ.get(WORKER_PORT_ENV)
    return int(value) if value else None


class HttpWorkers:
    """Runs ``count`` worker processes of ``command`` on ``port`` until stopped."""

    def __init__(self, command: Sequence[str], count: int, port: int) -> None:
        self._command = list(command)
        self._env = {**os.environ, WORKER_PORT_ENV: str(port)}
        self._processes: list[subprocess.Popen[bytes]] = []
        self._count = count
        self._stopping = False

    def start(self) -> None:
        self._processes = [self._spawn() for _ in range(self._count)]
        log.info("started %d HTTP worker process(es)", self._count)

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self._command, env=self._env)

    def supervise(self) -> None:
        """Restart any worker that exited (a crash must not shrink the listener for good)."""
        if self._stopping:
            return
        for index, process in enumerate(self._processes):
            if process.poll() is not None:
                log.warning("HTTP worker %d exited with %s; restarting it", process.pid, process.returncode)
                self._processes[index] = self._spawn()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker, wait for their drain, kill what is left after ``timeout``."""
        self._stopping = True
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("HTTP worker %d did not drain within %.0fs; killing it", process.pid, timeout)
                process.kill()
                process.wait()
