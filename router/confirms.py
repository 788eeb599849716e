"""Publishing a group of messages under one confirm window: all are sent, then all confirms awaited.

Waiting for each confirm before the next publish costs a broker round trip (and a quorum-queue
commit) per message; pipelining them lets RabbitMQ confirm the whole group in a few replies. The
group succeeds only when every message of it was confirmed; one nack, a timeout or a lost
connection fails the whole group, so a caller never answers "accepted" for an unconfirmed message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from kombu import Connection, Producer, Queue

from router.broker import (
    CONTENT_TYPE,
    BrokerSettings,
    BrokerUnavailable,
    FailoverConnection,
    Topology,
    connect,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """One message of a group: its queue, its encoded JSON body and its AMQP headers."""

    queue: Queue
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)


class _Confirms:
    """Follows the broker's acks and nacks of one channel's delivery tags.

    ``acked`` is the tag up to which every message was acked. RabbitMQ may ack a message on its own
    before an earlier one (they went to different queues), so a single ack counts only once every
    tag below it was acked too.
    """

    def __init__(self) -> None:
        self.acked = 0
        self.nacked = 0
        self._acked_ahead: set[int] = set()

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.acked = max(self.acked, delivery_tag)
        elif delivery_tag > self.acked:
            self._acked_ahead.add(delivery_tag)
        while self.acked + 1 in self._acked_ahead:
            self.acked += 1
            self._acked_ahead.remove(self.acked)
        if multiple and self._acked_ahead:
            self._acked_ahead = {tag for tag in self._acked_ahead if tag > self.acked}

    def nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked = max(self.nacked, delivery_tag)


class _Frames:
    """Collects the frames of a group, so that the whole group goes to the socket in one write.

    py-amqp's ``basic_publish`` writes each message on its own and first polls the socket for a
    connection.blocked notice: two system calls per message, which dominated a group's cost.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, frame: bytes | memoryview) -> None:
        self._parts.append(bytes(frame))  # a copy: the frame writer reuses its buffer

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class ConfirmWindow:
    """Publishes groups of persistent messages with pipelined publisher confirms, from one thread.

    On RabbitMQ the channel is put in confirm mode once; each group is published back to back and
    ``publish`` returns once the broker confirmed the last of it. The in-memory transport has no
    confirms: messages go one by one.
    """

    def __init__(self, settings: BrokerSettings, topology: Topology | None = None) -> None:
        self._settings = settings
        self._topology = topology or Topology(settings)
        self._connection: Connection | None = None
        self._channel: Any = None
        self._confirms = _Confirms()
        self._published = 0
        self._declared: set[str] = set()
        self._memory: Producer | None = None
        self._frames = _Frames()
        self._write_frame: Callable[..., None] | None = None
        self._failures = 0

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish every message of ``messages``; returns once RabbitMQ confirmed all of them.

        Raises :class:`BrokerUnavailable` when any was not confirmed (then none may be reported as
        accepted; some may still have reached the queue, which the callers' idempotency covers).
        """
        if messages:
            self.wait_for(self.send(messages))

    def send(self, messages: Sequence[Outgoing]) -> int:
        """Publish ``messages`` without waiting for their confirms; returns the sequence number of the
        last, for :meth:`wait_for` (numbers count up from 1 per connection, one per message)."""
        if self._settings.is_memory:
            self._publish_memory(messages)
            self._published += len(messages)
            self._confirms.acked = self._published  # the embedded transport has no confirms
            return self._published
        try:
            channel = self._ensure_channel()
            write_frame = self._write_frame
            assert write_frame is not None  # set with the channel
            exchange = self._topology.exchange.name
            for message in messages:
                self._declare(channel, message.queue)
                write_frame(
                    1,
                    channel.channel_id,
                    spec.Basic.Publish,
                    dumps("Bssbb", (0, exchange, message.queue.routing_key, False, False)),
                    channel.prepare_message(
                        message.body,
                        content_type=CONTENT_TYPE,
                        content_encoding="utf-8",
                        headers=dict(message.headers),
                        properties={"delivery_mode": 2},
                    ),
                )
                self._published += 1
            channel.connection.transport.write(self._frames.take())
            return self._published
        except Exception as error:  # kombu and py-amqp surface transport errors as many unrelated types
            self._reset()
            raise BrokerUnavailable(
                f"a group of {len(messages)} messages was not confirmed: {error}"
            ) from error

    @property
    def confirmed(self) -> int:
        """The sequence number up to which every message was confirmed."""
        return self._confirms.acked

    def wait_for(self, last: int) -> None:
        """Return once every message up to sequence number ``last`` was confirmed; raise
        :class:`BrokerUnavailable` on a nack, a timeout or a lost connection."""
        if self._confirms.acked >= last and not self._confirms.nacked:
            return
        try:
            self._await_confirms(last)
        except BrokerUnavailable:
            self._reset()
            raise
        except Exception as error:  # kombu and py-amqp surface transport errors as many unrelated types
            self._reset()
            raise BrokerUnavailable(f"messages up to {last} were not confirmed: {error}") from error

    def _publish_memory(self, messages: Sequence[Outgoing]) -> None:
        if self._memory is None:
            self._connection = connect(self._settings)
            self._memory = Producer(self._connection.default_channel, exchange=self._topology.exchange)
        for message in messages:
            self._memory.publish(
                message.body,
                routing_key=message.queue.routing_key,
                content_type=CONTENT_TYPE,
                content_encoding="utf-8",
                delivery_mode=2,
                headers=dict(message.headers),
                declare=[message.queue],
            )

    def _ensure_channel(self) -> Any:
        if self._channel is None:
            # No kombu confirm_publish here: that mode waits for each message's confirm on its own.
            # Every node is tried, starting after the one the last failed group went through: a node
            # that is up but does not confirm (a minority partition) is not taken again first.
            urls = self._settings.urls
            start = self._failures % len(urls)
            self._connection = FailoverConnection(
                urls[start:] + urls[:start], failover_strategy="round-robin", connect_timeout=5
            )
            self._connection.ensure_connection(max_retries=1)
            channel = self._connection.channel()
            self._confirms = _Confirms()
            channel.events["basic_ack"].add(self._confirms.ack)
            channel.events["basic_nack"].add(self._confirms.nack)
            channel.confirm_select()
            self._frames = _Frames()
            self._write_frame = frame_writer(channel.connection, self._frames)
            self._topology.exchange(channel).declare()
            self._channel, self._published, self._declared = channel, 0, set()
        return self._channel

    def _declare(self, channel: Any, queue: Queue) -> None:
        if queue.name not in self._declared:
            queue(channel).declare()
            self._declared.add(queue.name)

    def _await_confirms(self, last: int) -> None:
        """Wait until the broker acked every delivery tag up to ``last``; a nack among them fails."""
        assert self._connection is not None
        deadline = time.monotonic() + self._settings.confirm_timeout
        while self._confirms.acked < last:
            if self._confirms.nacked:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(
                    f"RabbitMQ did not confirm within {self._settings.confirm_timeout:g} s"
                )
            try:
                self._connection.drain_events(timeout=remaining)
            except TimeoutError:
                continue
        if self._confirms.nacked:
            raise BrokerUnavailable("RabbitMQ refused (nacked) a message of the group")

    def _reset(self) -> None:
        self._failures += 1
        self._channel = None
        self._memory = None
        if self._connection is not None:
            try:
                self._connection.collect()
            except Exception:  # a dead connection may fail to tear down; it is being dropped anyway
                log.debug("ignoring error while dropping a broken broker connection", exc_info=True)
            self._connection = None

    def close(self) -> None:
        """Release the connection."""
        if self._connection is not None:
            self._connection.release()
            self._connection = None
        self._channel = None
        self._memory = None
