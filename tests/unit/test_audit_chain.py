"""The audit chain's pure parts: the record hash and how `find_break` classifies a broken chain."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from state.audit_chain import GENESIS, record_hash
from state.audit_verify import BreakKind, ChainLink, find_break

AT = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


def _chain(count: int) -> list[ChainLink]:
    """``count`` well-chained records with ids 1..count."""
    links = []
    previous = GENESIS
    for n in range(1, count + 1):
        at = AT + timedelta(minutes=n)
        digest = record_hash(
            at=at, actor=f"op{n}", action="a", subject=f"s:{n}", detail={"n": n}, prev_hash=previous
        )
        links.append(
            ChainLink(
                id=n, at=at, actor=f"op{n}", action="a", prev_hash=previous, hash=digest, content_ok=True
            )
        )
        previous = digest
    return links


def _hash(**changes: object) -> str:
    fields: dict[str, object] = {
        "at": AT,
        "actor": "ann",
        "action": "deadletter.discarded",
        "subject": "deadletter:1",
        "detail": {"reason": "duplicate", "from": "dead"},
        "prev_hash": GENESIS,
    }
    return record_hash(**{**fields, **changes})  # type: ignore[arg-type]


def test_every_field_and_the_previous_hash_are_covered_but_not_key_order_or_zone() -> None:
    base = _hash()
    changed = [
        _hash(at=AT + timedelta(microseconds=1)),
        _hash(actor="bob"),
        _hash(action="deadletter.replayed"),
        _hash(subject="deadletter:2"),
        _hash(detail={"reason": "duplicat", "from": "dead"}),
        _hash(prev_hash="0" * 64),
    ]
    assert len({base, *changed}) == 1 + len(changed)
    assert _hash(detail={"from": "dead", "reason": "duplicate"}) == base
    assert _hash(at=AT.astimezone(timezone(timedelta(hours=-5)))) == base


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        _hash(at=datetime(2026, 12, 1, 7, 0))


def test_an_intact_chain_and_an_empty_trail_have_no_break() -> None:
    links = _chain(4)
    assert find_break(links, links[-1].hash) is None
    assert find_break([], GENESIS) is None


def test_records_appended_after_the_head_was_read_are_accepted() -> None:
    links = _chain(4)
    assert find_break(links, links[1].hash) is None


def test_a_missing_head_is_a_break() -> None:
    broken = find_break(_chain(2), None)
    assert broken is not None and broken.kind is BreakKind.DELETED and "head" in broken.message


def test_a_deleted_first_record_is_named_by_the_one_after_it() -> None:
    links = _chain(3)
    broken = find_break(links[1:], links[-1].hash)
    assert broken is not None and (broken.kind, broken.record) == (BreakKind.DELETED, links[1])
    assert "the start of the trail" in broken.message


def test_a_record_inserted_with_a_correct_hash_is_named_itself() -> None:
    links = _chain(4)
    forged_hash = record_hash(
        at=AT, actor="mallory", action="a", subject="s:x", detail=None, prev_hash=links[1].hash or ""
    )
    forged = ChainLink(
        id=25, at=AT, actor="mallory", action="a", prev_hash=links[1].hash, hash=forged_hash, content_ok=True
    )
    broken = find_break([*links[:2], forged, *links[2:]], links[-1].hash)
    assert broken is not None and (broken.kind, broken.record) == (BreakKind.INSERTED, forged)


def test_a_record_inserted_with_a_made_up_link_is_named_itself() -> None:
    links = _chain(4)
    forged = replace(links[2], id=25, actor="mallory", prev_hash="f" * 64, hash="e" * 64)
    broken = find_break([*links[:2], forged, *links[2:]], links[-1].hash)
    assert broken is not None and (broken.kind, broken.record) == (BreakKind.INSERTED, forged)


def test_a_moved_record_is_reported_as_reordered() -> None:
    one, two, three, four = _chain(4)
    broken = find_break([one, three, two, four], four.hash)
    assert broken is not None and (broken.kind, broken.record) == (BreakKind.REORDERED, three)


def test_a_changed_record_comes_before_its_broken_link() -> None:
    links = _chain(3)
    changed = replace(links[1], content_ok=False)
    broken = find_break([links[0], changed, links[2]], links[-1].hash)
    assert broken is not None and (broken.kind, broken.record) == (BreakKind.CONTENT_CHANGED, changed)


@given(size=st.integers(2, 12), data=st.data())
def test_any_single_deletion_swap_or_change_is_found_at_its_place(size: int, data: st.DataObject) -> None:
    links = _chain(size)
    head = links[-1].hash
    first = data.draw(st.integers(0, size - 1), label="first")
    tamper = data.draw(st.sampled_from(["delete", "swap", "change"]), label="tamper")
    if tamper == "swap" and first == size - 1:
        tamper = "change"

    if tamper == "delete":
        broken = find_break([*links[:first], *links[first + 1 :]], head)
        named = links[first + 1] if first + 1 < size else links[first - 1]
        assert broken is not None and (broken.kind, broken.record) == (BreakKind.DELETED, named)
    elif tamper == "swap":
        second = data.draw(st.integers(first + 1, size - 1), label="second")
        moved = list(links)
        moved[first], moved[second] = moved[second], moved[first]
        broken = find_break(moved, head)
        assert broken is not None and (broken.kind, broken.record) == (BreakKind.REORDERED, links[second])
    else:
        changed = list(links)
        changed[first] = replace(links[first], content_ok=False)
        broken = find_break(changed, head)
        assert broken is not None and (broken.kind, broken.record) == (
            BreakKind.CONTENT_CHANGED,
            changed[first],
        )
