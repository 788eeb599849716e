"""The canonical inventory events: one pydantic model per type, discriminated on ``type``.

Grounded in GS1 EPCIS 2.0 and its Core Business Vocabulary (CBV) without their verbosity: an event
says what happened (type, biz_step, disposition), to which item (sku/gtin), where (location), when
(occurred_at with its original offset) and how much (an exact Decimal quantity with its unit and
whether it is a movement or a level). Unknown keys are refused, so a mapping typo is a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails

from canonical.fields import (
    BizStepWord,
    BizTransactionWord,
    CurrencyCode,
    DispositionWord,
    Gtin,
    LocationCode,
    NonNegativeQuantity,
    Quantity,
    Text,
    UnitCode,
    refusal,
)

SCHEMA_VERSION: Literal[1] = 1


class CanonicalModel(BaseModel):
    """Shared strictness: unknown keys refused, identifiers given as numbers kept as text."""

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        coerce_numbers_to_str=True,
        use_attribute_docstrings=True,
    )


class SourceRef(CanonicalModel):
    """Where an event came from, precisely enough to find the raw record again."""

    route: Text
    """The route that produced the event."""
    system: Text
    """The upstream system (POS, supplier, partner) the route reads."""
    message_id: Text
    """The ingress message (file chunk, webhook delivery, REST page) that carried the record."""
    record: int | Text
    """The record number within the message, or the record's own id."""
    file: Text | None = None
    """The source file name, for file and SFTP sources."""
    line: int | None = Field(default=None, ge=1)
    """The line in the source file where the record starts."""
    segment: int | None = Field(default=None, ge=1)
    """For X12 and EDIFACT: the position in the file of the record's first segment."""


class BizTransaction(CanonicalModel):
    """A business document the event relates to (CBV business transaction)."""

    type: BizTransactionWord
    """po, desadv (ASN), recadv (receiving advice), inv (invoice), rma or order."""
    id: Text
    """The document's number in the issuing system."""


class InventoryEvent(CanonicalModel):
    """The fields every canonical inventory event has; each type adds its own."""

    event_id: Text
    """Deterministic: the same source record always yields the same id (use it as Idempotency-Key)."""
    type: str
    """The event type, which decides the type-specific fields."""
    schema_version: Literal[1] = SCHEMA_VERSION
    """The canonical model's version."""
    occurred_at: AwareDatetime
    """When it happened, with the offset the source gave (or the route's zone supplied)."""
    recorded_at: AwareDatetime
    """When the router turned the record into this event."""
    source: SourceRef
    """The route, system, message and record the event came from."""
    sku: Text | None = None
    """The retailer's item number; sku and/or gtin is required."""
    gtin: Gtin | None = None
    """The GS1 GTIN, check digit verified, as 14 digits."""
    alt_ids: dict[Text, Text] | None = None
    """Other item numbers by scheme, e.g. a supplier's or a marketplace's."""
    location: LocationCode
    """The store or DC code, or its 13-digit GLN (check digit verified)."""
    sublocation: Text | None = None
    """Where within the location: backroom, shelf, bin."""
    quantity: Quantity
    """How much, as an exact decimal (serialised as a string)."""
    uom: UnitCode = "EA"
    """The unit, as a UN/ECE Recommendation 20 code."""
    quantity_semantics: Literal["delta"] = "delta"
    """delta: quantity is a movement; stock.snapshot and cycle.count say absolute: a level."""
    biz_step: BizStepWord | None = None
    """The CBV business step, e.g. receiving, picking, retail_selling."""
    disposition: DispositionWord | None = None
    """The CBV disposition of the goods afterwards, e.g. sellable_accessible, damaged, in_transit."""
    biz_transactions: list[BizTransaction] = Field(default_factory=list)
    """The business documents (PO, ASN, order, ...) the event relates to."""
    correlation_id: Text | None = None
    """Ties events of one business flow together across routes."""
    sequence_key: Text
    """The ordering key: events with the same key reach each target in order."""

    @model_validator(mode="after")
    def _identifies_the_item(self) -> Self:
        if self.sku is None and self.gtin is None:
            raise refusal(f"a {self.type} event needs the item: give sku, gtin or both")
        return self


class StockSnapshot(InventoryEvent):
    """The stock level of an item at a location at a moment: quantity is on hand."""

    type: Literal["stock.snapshot"]
    # Narrowing the base's Literal is how pydantic refuses "delta" here; mypy sees an unsafe override.
    quantity_semantics: Literal["absolute"] = "absolute"  # type: ignore[assignment]
    """Always absolute: a snapshot states a level."""
    available: Quantity | None = None
    """On hand that can be sold or allocated."""
    reserved: Quantity | None = None
    """On hand held for orders."""


class StockAdjustment(InventoryEvent):
    """A signed correction of stock (shrink, damage, found), with the reason for it."""

    type: Literal["stock.adjustment"]
    reason_code: Text
    """Why stock changed, in the source system's reason codes (e.g. DAMAGED, THEFT, FOUND)."""


class Sale(InventoryEvent):
    """Units sold at a point of sale; quantity is the units sold (stock goes down by it)."""

    type: Literal["sale"]
    quantity: NonNegativeQuantity
    """Units sold; a returned item is a return event, not a negative sale."""
    transaction_id: Text | None = None
    """The POS transaction (receipt) number."""
    register_id: Text | None = None
    """The till or register."""
    line: int | None = Field(default=None, ge=1)
    """The line within the transaction."""
    unit_price: NonNegativeQuantity | None = None
    """The price of one unit, in currency."""
    currency: CurrencyCode | None = None
    """ISO 4217 code of unit_price."""

    @model_validator(mode="after")
    def _price_has_currency(self) -> Self:
        if self.unit_price is not None and self.currency is None:
            raise refusal("a sale with unit_price needs its currency (an ISO 4217 code such as USD)")
        return self


class Return(InventoryEvent):
    """Units a customer brought back; quantity is the units returned."""

    type: Literal["return"]
    quantity: NonNegativeQuantity
    """Units returned."""
    return_disposition: Literal["restock", "refurbish", "vendor", "dispose"] | None = None
    """What happens to the goods: restock (sellable again), refurbish, back to the vendor, dispose."""
    rma_id: Text | None = None
    """The return merchandise authorisation."""
    original_transaction_id: Text | None = None
    """The sale transaction the goods were bought in."""
    reason_code: Text | None = None
    """Why the customer returned them."""


class GoodsReceipt(InventoryEvent):
    """Goods received at a location, against a purchase order and/or an ASN."""

    type: Literal["goods.receipt"]
    quantity: NonNegativeQuantity
    """Units received."""
    po_id: Text | None = None
    """The purchase order received against."""
    asn_id: Text | None = None
    """The advance shipping notice received against."""
    supplier: Text | None = None
    """The supplier's code or GLN."""
    line: int | None = Field(default=None, ge=1)
    """The PO or ASN line."""


class Asn(InventoryEvent):
    """An advance shipping notice line: goods expected to arrive at location."""

    type: Literal["asn"]
    quantity: NonNegativeQuantity
    """Units expected."""
    asn_id: Text
    """The ASN (despatch advice) number."""
    po_id: Text | None = None
    """The purchase order the goods were shipped against."""
    expected_at: AwareDatetime | None = None
    """When the goods are expected."""
    supplier: Text | None = None
    """The supplier's code or GLN."""
    line: int | None = Field(default=None, ge=1)
    """The ASN line."""


class Transfer(InventoryEvent):
    """Stock moving between two locations; location defaults to where the status happens."""

    type: Literal["transfer"]
    quantity: NonNegativeQuantity
    """Units transferred."""
    from_location: LocationCode
    """The sending store or DC."""
    to_location: LocationCode
    """The receiving store or DC."""
    status: Literal["requested", "shipped", "received", "cancelled"]
    """Where the transfer stands."""
    transfer_id: Text | None = None
    """The transfer order number."""

    @model_validator(mode="before")
    @classmethod
    def _location_from_status(cls, data: Any) -> Any:
        # The stock changes at the receiving end when received, at the sending end otherwise.
        if isinstance(data, Mapping) and data.get("location") is None:
            end = data.get("to_location" if data.get("status") == "received" else "from_location")
            if end is not None:
                return {**data, "location": end}
        return data

    @model_validator(mode="after")
    def _two_different_locations(self) -> Self:
        if self.from_location == self.to_location:
            raise refusal(
                f"a transfer needs two different locations; from and to are both {self.to_location!r}"
            )
        return self


class Reservation(InventoryEvent):
    """Stock held for an order: created, released back, or consumed by fulfilment."""

    type: Literal["reservation"]
    quantity: NonNegativeQuantity
    """Units reserved, released or consumed."""
    status: Literal["created", "released", "consumed"]
    """What happened to the reservation."""
    order_id: Text | None = None
    """The customer order the stock is held for."""
    reservation_id: Text | None = None
    """The reservation's own id in the OMS."""


class Shipment(InventoryEvent):
    """An order shipped from location: stock leaves."""

    type: Literal["shipment"]
    quantity: NonNegativeQuantity
    """Units shipped."""
    order_id: Text
    """The customer order shipped."""
    shipment_id: Text | None = None
    """The shipment (parcel or load) id."""
    carrier: Text | None = None
    """The carrier, e.g. UPS."""
    tracking_number: Text | None = None
    """The carrier's tracking number."""


class CycleCount(InventoryEvent):
    """A physical count: counted vs the expected (book) level; quantity is what was counted."""

    type: Literal["cycle.count"]
    # Narrowing the base's Literal is how pydantic refuses "delta" here; mypy sees an unsafe override.
    quantity_semantics: Literal["absolute"] = "absolute"  # type: ignore[assignment]
    """Always absolute: a count states a level."""
    counted: NonNegativeQuantity
    """Units found; equals quantity, and either may be given alone."""
    expected: Quantity | None = None
    """The level the system expected (book stock)."""
    variance: Quantity | None = None
    """counted minus expected; computed when absent."""

    @model_validator(mode="before")
    @classmethod
    def _quantity_is_counted(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            if data.get("counted") is None and data.get("quantity") is not None:
                return {**data, "counted": data["quantity"]}
            if data.get("quantity") is None and data.get("counted") is not None:
                return {**data, "quantity": data["counted"]}
        return data

    @model_validator(mode="after")
    def _variance_adds_up(self) -> Self:
        if self.quantity != self.counted:
            raise refusal(f"a cycle.count's quantity {self.quantity} must equal counted {self.counted}")
        if self.expected is not None:
            computed = self.counted - self.expected
            if self.variance is None:
                self.variance = computed
            elif self.variance != computed:
                raise refusal(
                    f"variance {self.variance} does not match counted {self.counted} minus expected"
                    f" {self.expected} = {computed}"
                )
        return self


EVENT_MODELS: dict[str, type[InventoryEvent]] = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in (
        StockSnapshot,
        StockAdjustment,
        Sale,
        Return,
        GoodsReceipt,
        Asn,
        Transfer,
        Reservation,
        Shipment,
        CycleCount,
    )
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_MODELS)

CanonicalEvent = Annotated[
    StockSnapshot
    | StockAdjustment
    | Sale
    | Return
    | GoodsReceipt
    | Asn
    | Transfer
    | Reservation
    | Shipment
    | CycleCount,
    Field(discriminator="type"),
]
"""Any canonical event, discriminated on ``type`` (for JSON Schema and typed containers)."""


def parse_event(data: Mapping[str, Any]) -> InventoryEvent:
    """Validate ``data`` into the model of its ``type``.

    Raises pydantic.ValidationError naming each bad field (without the type as a path prefix) and what
    was expected, including for a missing or unknown type.
    """
    event_type = data.get("type")
    model = EVENT_MODELS.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        given = "missing" if event_type is None else f"{event_type!r} is not an event type"
        problem = refusal(f"{given}; expected one of {', '.join(EVENT_TYPES)}")
        raise ValidationError.from_exception_data(
            "InventoryEvent", [InitErrorDetails(type=problem, loc=("type",), input=event_type)]
        )
    return model.model_validate(data)
