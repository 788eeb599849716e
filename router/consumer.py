"""A broker consumer that buffers deliveries for the owning thread, and a reconnecting loop around it.

Deliveries are only appended to a buffer in the kombu callback; the worker thread handles them after
``drain_events`` returns. That keeps message handling out of kombu's callback stack, so a handler may
publish (and wait for a confirm) on the same connection without being re-entered by a new delivery.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kombu import Connection, Consumer, Queue
from kombu.message import Message

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 0.25
"""Seconds a worker's fetch waits for a message before it looks at its stop event again."""
DRAIN_POLL = 0.001
"""Seconds a fetch waits for more once the socket looks empty."""


class BufferedConsumer:
    """Consumes ``queues`` with a per-consumer prefetch and hands messages out in arrival order."""

    def __init__(self, connection: Connection, queues: Sequence[Queue], prefetch: int) -> None:
        self._connection = connection
        self._buffer: deque[Message] = deque()
        self._drained_at = time.monotonic()
        self.sent_after = self._drained_at
        """A moment (monotonic) before which the broker sent none of the messages of the last fetch:
        the last time the socket was read empty before them. A message's consumer timeout runs from
        when the broker sent it, which may be well before the worker reads it."""
        self._channel = connection.channel()
        self._consumer = Consumer(
            self._channel,
            queues=list(queues),
            on_message=self._buffer.append,
            prefetch_count=prefetch,
            auto_declare=True,
        )
        self._consumer.consume()

    def fetch(self, timeout: float) -> list[Message]:
        """Every message that arrived, waiting up to ``timeout`` seconds when none are buffered."""
        self.sent_after = self._drained_at
        if not self._buffer:
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=timeout)
        # Read what else the broker has sent (up to the prefetch), so none of it waits unseen in the
        # socket while these are handled; the moment the socket is found empty bounds what comes next.
        while True:
            empty_since = time.monotonic()
            try:
                self._connection.drain_events(timeout=DRAIN_POLL)
            except TimeoutError:
                self._drained_at = empty_since
                break
        messages = list(self._buffer)
        self._buffer.clear()
        return messages

    def close(self) -> None:
        """Stop consuming: unacknowledged messages go back to their queues on RabbitMQ.

        The channel is closed without cancelling the consumer first: a cancel alone would let
        single-active-consumer hand the queue to a waiting consumer while this one's unacknowledged
        messages are still out, and that consumer would get later messages before they return.
        """
        try:
            self._channel.close()
        except Exception:  # closing a broken channel may fail; the connection is going away
            log.debug("ignoring error while closing a consumer", exc_info=True)


def run_reconnecting(
    name: str,
    session: Callable[[], None],
    stop: threading.Event,
    *,
    initial_delay: float = 0.5,
    max_delay: float = 15.0,
    until: Callable[[], bool] | None = None,
) -> None:
    """Run ``session`` until ``stop`` (or ``until()`` is true); when it fails (broker gone) log and retry
    with backoff."""
    delay = initial_delay
    while not stop.is_set() and not (until is not None and until()):
        try:
            session()
            delay = initial_delay
        except Exception as error:
            log.warning("%s lost its broker session (%s); reconnecting in %.1fs", name, error, delay)
            stop.wait(delay)
            delay = min(delay * 2, max_delay)
