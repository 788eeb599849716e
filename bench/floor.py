"""The raw floor the benchmarks compare against: plain pika at its best.

Persistent messages into a quorum queue with pipelined publisher confirms (a window of ~1,000
unconfirmed messages, never one blocking confirm per message), and for the end-to-end floor the same
messages consumed back with a prefetch window and acknowledged in groups.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pika

FLOOR_WINDOW = 1000


def pika_url(amqp_url: str) -> str:
    # kombu spells the default vhost "//" at the end of the URL; pika needs it percent-encoded.
    return amqp_url[:-1] + "%2F" if amqp_url.endswith("//") else amqp_url


def pika_pipelined_floor(
    amqp_url: str, messages: int, body: bytes, window: int = FLOOR_WINDOW, *, consume: bool = False
) -> float:
    """Messages/s publishing persistent messages into a quorum queue, ``window`` confirms outstanding;
    with ``consume``, messages/s moved through it: published, then consumed and acknowledged."""
    queue = f"bench.floor.{uuid.uuid4().hex[:8]}"
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    state = {"sent": 0, "confirmed": 0, "last_tag": 0, "consumed": 0, "started": 0.0, "elapsed": 0.0}

    def pump(channel: Any) -> None:
        while state["sent"] - state["confirmed"] < window and state["sent"] < messages:
            channel.basic_publish("", queue, body, properties)
            state["sent"] += 1

    def on_confirm(channel: Any, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            raise RuntimeError("the floor's queue nacked a message")
        tag = method.delivery_tag
        state["confirmed"] += tag - state["last_tag"] if method.multiple else 1
        state["last_tag"] = max(state["last_tag"], tag)
        if state["confirmed"] < messages:
            pump(channel)
        elif consume:
            channel.basic_qos(
                prefetch_count=window,
                callback=lambda _: channel.basic_consume(queue, lambda *args: on_message(channel, *args)),
            )
        else:
            finish(channel)

    def on_message(channel: Any, _channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        state["consumed"] += 1
        # Acknowledged in groups, as a consumer at its best does: one ack covers the window's half.
        if state["consumed"] % (window // 2) == 0 or state["consumed"] == messages:
            channel.basic_ack(method.delivery_tag, multiple=True)
        if state["consumed"] == messages:
            finish(channel)

    def finish(channel: Any) -> None:
        state["elapsed"] = time.perf_counter() - state["started"]
        channel.queue_delete(queue, callback=lambda _: channel.connection.close())

    def on_declared(channel: Any) -> None:
        state["started"] = time.perf_counter()
        pump(channel)

    def on_channel(channel: Any) -> None:
        channel.confirm_delivery(lambda frame: on_confirm(channel, frame))
        channel.queue_declare(
            queue,
            durable=True,
            arguments={"x-queue-type": "quorum"},
            callback=lambda _: on_declared(channel),
        )

    connection = pika.SelectConnection(
        pika.URLParameters(pika_url(amqp_url)),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_close_callback=lambda conn, _reason: conn.ioloop.stop(),
    )
    connection.ioloop.start()
    if state["confirmed"] < messages or (consume and state["consumed"] < messages):
        raise RuntimeError(
            f"the floor confirmed {state['confirmed']} and consumed {state['consumed']} "
            f"of {messages} messages"
        )
    return messages / state["elapsed"]
