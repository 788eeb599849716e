"""The canonical inventory model: event types, identifiers, ordering keys and the JSON Schema."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from canonical.events import EVENT_MODELS, EVENT_TYPES, SCHEMA_VERSION, parse_event
from canonical.fields import BIZ_STEPS
from canonical.ids import (
    derive_event_id,
    gs1_check_digit,
    is_valid_gs1,
    normalize_gtin,
    partition_for,
    sequence_key_for,
)
from canonical.schema import json_schema

STORE_GLN = "0614141000029"

COMMON: dict[str, Any] = {
    "event_id": "9ecbe95e-f3ef-5acf-b01b-e0a6ef68d7a0",
    "occurred_at": "2026-11-24T08:00:01-05:00",
    "recorded_at": "2026-11-24T13:00:02+00:00",
    "source": {
        "route": "pos-sales",
        "system": "pos",
        "message_id": "m-1",
        "record": 13,
        "file": "pos-1.csv",
        "line": 14,
    },
    "sku": "SKU-RED-TEE-M",
    "location": "S001",
    "quantity": "2",
    "sequence_key": "pending",
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "stock.snapshot": {"quantity": "40", "available": "35", "reserved": "5"},
    "stock.adjustment": {"quantity": "-3", "reason_code": "DAMAGED", "disposition": "damaged"},
    "sale": {
        "transaction_id": "T1001",
        "register_id": "R1",
        "line": 1,
        "unit_price": "19.99",
        "currency": "usd",
    },
    "return": {"return_disposition": "restock", "rma_id": "RMA-7", "original_transaction_id": "T1001"},
    "goods.receipt": {
        "po_id": "4500012345",
        "biz_step": "receiving",
        "biz_transactions": [{"type": "po", "id": "4500012345"}, {"type": "desadv", "id": "ASN-9"}],
    },
    "asn": {"asn_id": "ASN-9", "expected_at": "2026-11-26T06:00:00+01:00", "supplier": "ACME", "line": 2},
    "transfer": {
        "from_location": "S001",
        "to_location": "DC-EAST",
        "status": "shipped",
        "transfer_id": "TR-5",
    },
    "reservation": {"status": "created", "order_id": "O-88"},
    "shipment": {"order_id": "O-88", "carrier": "UPS", "tracking_number": "1Z999"},
    "cycle.count": {"quantity": "7", "expected": "9", "biz_step": "cycle_counting"},
}


def event(event_type: str, **changes: Any) -> dict[str, Any]:
    """A valid candidate event of ``event_type``, as the transform stage builds it, with ``changes``."""
    return {**COMMON, "type": event_type, **EXAMPLES[event_type], **changes}


def problems(error: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    """The validation errors as {field path: message}."""
    return {".".join(map(str, item["loc"])): item["msg"] for item in error.value.errors()}


# Event types


def test_the_examples_cover_every_event_type() -> None:
    assert set(EXAMPLES) == set(EVENT_TYPES) == set(EVENT_MODELS)
    assert len(EVENT_TYPES) == 10


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_type_parses_into_its_own_model_and_dumps_as_json(event_type: str) -> None:
    parsed = parse_event(event(event_type))
    assert isinstance(parsed, EVENT_MODELS[event_type])
    dumped = parsed.model_dump(mode="json")
    assert dumped["type"] == event_type
    assert dumped["schema_version"] == SCHEMA_VERSION
    assert dumped["uom"] == "EA"
    assert dumped["source"]["record"] == 13
    assert parse_event(dumped).model_dump(mode="json") == dumped  # a delivered event re-validates unchanged


def test_a_sale_dumps_quantity_and_price_as_exact_strings() -> None:
    dumped = parse_event(event("sale", quantity=Decimal("2.50"))).model_dump(mode="json")
    assert (dumped["quantity"], dumped["unit_price"], dumped["currency"]) == ("2.50", "19.99", "USD")


@pytest.mark.parametrize(
    ("event_type", "semantics"),
    [("stock.snapshot", "absolute"), ("cycle.count", "absolute"), ("sale", "delta"), ("transfer", "delta")],
)
def test_quantity_semantics_default_by_type(event_type: str, semantics: str) -> None:
    assert parse_event(event(event_type)).quantity_semantics == semantics


def test_a_snapshot_that_says_delta_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("stock.snapshot", quantity_semantics="delta"))
    assert problems(caught) == {"quantity_semantics": "Input should be 'absolute'"}


def test_an_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", qty="3"))
    assert problems(caught) == {"qty": "Extra inputs are not permitted"}


@pytest.mark.parametrize(("given", "start"), [("sales", "'sales' is not an event type"), (None, "missing")])
def test_an_unknown_or_missing_type_lists_the_known_types(given: str | None, start: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event({**COMMON, "type": given})
    message = problems(caught)["type"]
    assert message.startswith(start)
    assert all(name in message for name in EVENT_TYPES)


def test_an_event_needs_sku_or_gtin() -> None:
    with pytest.raises(ValidationError, match="needs the item: give sku, gtin or both"):
        parse_event(event("sale", sku=None))
    assert parse_event(event("sale", sku=None, gtin="4006381333931")).sku is None


def test_another_schema_version_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", schema_version=2))
    assert problems(caught) == {"schema_version": "Input should be 1"}


def test_type_specific_required_fields_are_named() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event({**COMMON, "type": "transfer", "location": "S001"})
    assert set(problems(caught)) == {"from_location", "to_location", "status"}
    with pytest.raises(ValidationError) as caught:
        parse_event({**COMMON, "type": "stock.adjustment"})
    assert problems(caught) == {"reason_code": "Field required"}


def test_a_movement_quantity_cannot_be_negative_but_an_adjustment_can() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", quantity="-1"))
    assert problems(caught) == {"quantity": "Input should be greater than or equal to 0"}
    assert parse_event(event("stock.adjustment", quantity="-3")).quantity == Decimal("-3")


def test_a_priced_sale_needs_its_currency() -> None:
    with pytest.raises(ValidationError, match="unit_price needs its currency"):
        parse_event(event("sale", currency=None))
    with pytest.raises(ValidationError, match="'dollars' is not an ISO 4217 currency code"):
        parse_event(event("sale", currency="dollars"))


def test_a_transfer_happens_at_the_sending_end_until_received() -> None:
    candidate = event("transfer")
    del candidate["location"]
    assert parse_event(candidate).location == "S001"
    assert parse_event({**candidate, "status": "received"}).location == "DC-EAST"
    with pytest.raises(ValidationError, match="two different locations"):
        parse_event(event("transfer", to_location="S001"))


def test_unit_codes_are_rec20_shaped_and_upper_cased() -> None:
    assert parse_event(event("sale", uom="kgm")).uom == "KGM"
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", uom="each"))
    assert "not a UN/ECE Recommendation 20 unit code" in problems(caught)["uom"]


# Time


def test_occurred_at_keeps_its_original_offset() -> None:
    dumped = parse_event(event("sale")).model_dump(mode="json")
    assert dumped["occurred_at"] == "2026-11-24T08:00:01-05:00"
    zoned = datetime(2026, 11, 24, 8, 0, 1, tzinfo=ZoneInfo("America/New_York"))
    from_mapping = parse_event(event("sale", occurred_at=zoned)).model_dump(mode="json")
    assert from_mapping["occurred_at"] == "2026-11-24T08:00:01-05:00"


@pytest.mark.parametrize("naive", ["2026-11-24T08:00:01", datetime(2026, 11, 24, 8, 0, 1)])
def test_a_naive_occurred_at_is_refused(naive: str | datetime) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", occurred_at=naive))
    assert problems(caught) == {"occurred_at": "Input should have timezone info"}


# Quantities


def test_a_float_quantity_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", quantity=0.1))
    assert "binary float" in problems(caught)["quantity"]


@pytest.mark.parametrize("value", [Decimal("NaN"), "Infinity", "-inf"])
def test_a_non_finite_quantity_is_refused(value: Decimal | str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("stock.snapshot", quantity=value))
    assert problems(caught) == {"quantity": "Input should be a finite number"}


def test_cycle_count_variance_is_computed_when_absent() -> None:
    counted = parse_event(event("cycle.count"))
    assert (counted.counted, counted.variance) == (Decimal("7"), Decimal("-2"))
    only_counted = event("cycle.count", counted="4", expected=None)
    del only_counted["quantity"]
    assert parse_event(only_counted).model_dump(mode="json")["quantity"] == "4"


def test_cycle_count_inconsistent_variance_or_quantity_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"variance 1 does not match counted 7 minus expected 9 = -2"):
        parse_event(event("cycle.count", variance="1"))
    with pytest.raises(ValidationError, match="quantity 7 must equal counted 6"):
        parse_event(event("cycle.count", counted="6"))


# GS1 identifiers


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("96385074", "00000096385074"),
        ("036000291452", "00036000291452"),
        (" 4006381333931 ", "04006381333931"),
        ("10614141000415", "10614141000415"),
        (36000291452, "00036000291452"),
    ],
)
def test_gtins_normalise_to_fourteen_digits(given: str | int, normalised: str) -> None:
    assert normalize_gtin(given) == normalised
    assert parse_event(event("sale", gtin=given)).gtin == normalised


def test_a_gtin_with_a_bad_check_digit_says_which_digit_was_expected() -> None:
    with pytest.raises(ValueError, match="check digit 2, but the GS1 mod-10 check digit is 1"):
        normalize_gtin("4006381333932")
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", gtin="4006381333932"))
    assert "gtin" in problems(caught)


@pytest.mark.parametrize("bad", ["40063813339", "4006-381333931", "", "123456789012345"])
def test_a_gtin_of_the_wrong_shape_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="expected 8, 12, 13 or 14 digits"):
        normalize_gtin(bad)


def test_gs1_check_digits() -> None:
    assert gs1_check_digit("400638133393") == 1
    assert gs1_check_digit("061414100002") == 9
    assert is_valid_gs1(STORE_GLN) and not is_valid_gs1("0614141000028") and not is_valid_gs1("06141410000x9")
    with pytest.raises(ValueError, match="digits only"):
        gs1_check_digit("12a")


def test_a_thirteen_digit_location_is_a_gln_and_its_check_digit_is_verified() -> None:
    assert parse_event(event("sale", location=STORE_GLN)).location == STORE_GLN
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", location="0614141000028"))
    assert problems(caught)["location"].endswith("its check digit is 8 where GS1 mod-10 gives 9")
    with pytest.raises(ValidationError, match="check digit"):
        parse_event(event("transfer", to_location="0614141000028"))
    assert parse_event(event("sale", location="STORE-000000001")).location == "STORE-000000001"


# CBV vocabulary


@pytest.mark.parametrize(
    ("field", "given", "word"),
    [
        ("biz_step", "urn:epcglobal:cbv:bizstep:receiving", "receiving"),
        ("biz_step", "https://ref.gs1.org/cbv/BizStep-cycle_counting", "cycle_counting"),
        ("biz_step", " Picking ", "picking"),
        ("disposition", "urn:epcglobal:cbv:disp:in_transit", "in_transit"),
        ("disposition", "https://ref.gs1.org/cbv/Disp-sellable_accessible", "sellable_accessible"),
        ("disposition", "damaged", "damaged"),
    ],
)
def test_cbv_urn_and_uri_forms_normalise_to_the_bare_word(field: str, given: str, word: str) -> None:
    assert parse_event(event("goods.receipt", **{field: given})).model_dump(mode="json")[field] == word


def test_biz_transaction_types_accept_the_cbv_urn_form() -> None:
    parsed = parse_event(
        event("goods.receipt", biz_transactions=[{"type": "urn:epcglobal:cbv:btt:po", "id": 45}])
    )
    assert parsed.model_dump(mode="json")["biz_transactions"] == [{"type": "po", "id": "45"}]
    with pytest.raises(ValidationError) as caught:
        parse_event(event("goods.receipt", biz_transactions=[{"type": "bol", "id": "B1"}]))
    assert "po, desadv, recadv, inv, rma, order" in problems(caught)["biz_transactions.0.type"]


@pytest.mark.parametrize("given", ["selling", "urn:epcglobal:cbv:disp:damaged"])
def test_an_unknown_biz_step_is_refused_with_the_allowed_words(given: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event(event("sale", biz_step=given))
    message = problems(caught)["biz_step"]
    assert message.startswith(f"{given!r} is not a CBV business step; expected one of accepting, arriving")
    assert all(word in message for word in BIZ_STEPS)


# Event ids, sequence keys, partitions


def test_event_ids_are_deterministic_uuids() -> None:
    first = derive_event_id("pos-sales", "pos", "pos-0001.csv", "ab12", 13)
    assert first == derive_event_id("pos-sales", "pos", "pos-0001.csv", "ab12", 13)
    # Pinned: a change here would stop re-ingested records from deduplicating against older deliveries.
    assert first == "9ecbe95e-f3ef-5acf-b01b-e0a6ef68d7a0"
    assert uuid.UUID(first).version == 5
    assert derive_event_id("pos-sales", "pos", "pos-0001.csv", "ab12", 14) != first


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "bc"), ("ab", "c")),
        (("a|b", "c"), ("a", "b|c")),
        (("1",), (1,)),
        (("",), ()),
        ((None,), ("null",)),
    ],
)
def test_event_ids_of_different_parts_differ(left: tuple[Any, ...], right: tuple[Any, ...]) -> None:
    assert derive_event_id(*left) != derive_event_id(*right)


def test_sequence_key_joins_the_fields_and_falls_back_to_the_gtin() -> None:
    dumped = parse_event(event("sale", location=STORE_GLN)).model_dump(mode="json")
    assert sequence_key_for(dumped, ["sku", "location"]) == f"SKU-RED-TEE-M|{STORE_GLN}"
    by_gtin = parse_event(event("sale", sku=None, gtin="4006381333931")).model_dump(mode="json")
    assert sequence_key_for(by_gtin, ["sku", "location"]) == "04006381333931|S001"


def test_sequence_key_names_a_missing_field() -> None:
    dumped = parse_event(event("sale")).model_dump(mode="json")
    with pytest.raises(ValueError, match="sequence_key field 'sublocation' is missing or empty"):
        sequence_key_for(dumped, ["sku", "sublocation"])
    with pytest.raises(ValueError, match="'sku' \\(or 'gtin'\\)"):
        sequence_key_for({**dumped, "sku": "  "}, ["sku"])


def test_partitions_are_stable_crc32() -> None:
    # Pinned crc32("SKU-RED-TEE-M|0614141000029") = 1152696627: the same key must hit the same partition
    # from every process, host and Python version, or per-key order breaks.
    assert partition_for(f"SKU-RED-TEE-M|{STORE_GLN}", 1 << 32) == 1152696627
    assert partition_for(f"SKU-RED-TEE-M|{STORE_GLN}", 8) == 3
    assert {partition_for(f"SKU-{n}|S001", 4) for n in range(200)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least 1"):
        partition_for("key", 0)


# JSON Schema


def test_json_schema_of_all_types_is_a_discriminated_union() -> None:
    document = json_schema()
    Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"] and document["title"] == "Canonical inventory event"
    assert document["discriminator"]["propertyName"] == "type"
    assert set(document["discriminator"]["mapping"]) == set(EVENT_TYPES)
    assert len(document["oneOf"]) == len(EVENT_TYPES)


def test_json_schema_of_one_type() -> None:
    document = json_schema("cycle.count")
    Draft202012Validator.check_schema(document)
    assert document["title"] == "Canonical inventory event: cycle.count"
    assert document["$id"].endswith(":cycle.count") and document["$id"] != json_schema()["$id"]
    assert document["properties"]["type"]["const"] == "cycle.count"
    assert {"counted", "location", "quantity", "occurred_at"} <= set(document["required"])


def test_json_schema_of_an_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown event type 'sales'; known types: stock\.snapshot, .*cycle\.count"
    ):
        json_schema("sales")


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_schema_validates_a_dumped_event(event_type: str) -> None:
    dumped = parse_event(event(event_type, gtin="036000291452")).model_dump(mode="json")
    Draft202012Validator(json_schema()).validate(dumped)
    Draft202012Validator(json_schema(event_type)).validate(dumped)


def test_the_schema_rejects_what_the_model_rejects() -> None:
    dumped = parse_event(event("sale")).model_dump(mode="json")
    validator = Draft202012Validator(json_schema())
    assert not validator.is_valid({**dumped, "qty": "3"})
    assert not validator.is_valid({**dumped, "type": "sales"})
    assert not validator.is_valid({key: value for key, value in dumped.items() if key != "location"})
    assert not validator.is_valid({**dumped, "biz_step": "selling"})
