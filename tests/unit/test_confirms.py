"""The confirm window's bookkeeping of RabbitMQ's acks."""

from __future__ import annotations

from router.confirms import _Confirms


def test_a_message_acked_before_an_earlier_one_counts_only_once_the_earlier_one_is_acked() -> None:
    confirms = _Confirms()
    confirms.ack(3, multiple=False)  # e.g. the last partition batch's queue answered first
    assert confirms.acked == 0
    confirms.ack(1, multiple=False)
    assert confirms.acked == 1
    confirms.ack(2, multiple=False)
    assert confirms.acked == 3


def test_a_multiple_ack_covers_every_tag_up_to_it_and_the_single_acks_beyond() -> None:
    confirms = _Confirms()
    confirms.ack(5, multiple=False)
    confirms.ack(4, multiple=True)
    assert confirms.acked == 5
    confirms.ack(2, multiple=True)  # a late, older multiple ack never moves it back
    assert confirms.acked == 5
