"""The validated value types canonical events are made of: the CBV vocabulary, exact quantities,
GTINs, location, unit and currency codes, each refusing a bad value with a message that names it."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from canonical.ids import check_gln_if_numeric, normalize_gtin

BizStep = Literal[
    "accepting", "arriving", "assembling", "collecting", "commissioning", "consigning",
    "creating_class_instance", "cycle_counting", "decommissioning", "departing", "destroying",
    "disassembling", "dispensing", "encoding", "entering_exiting", "holding", "inspecting", "installing",
    "killing", "loading", "other", "packing", "picking", "receiving", "removing", "repackaging",
    "repairing", "replacing", "reserving", "retail_selling", "sampling", "sensor_reporting", "shipping",
    "staging_outbound", "stock_taking", "stocking", "storing", "transporting", "unloading", "unpacking",
    "void_shipping",
]  # fmt: skip
Disposition = Literal[
    "active", "available", "completeness_inferred", "completeness_verified", "conformant",
    "container_closed", "container_open", "damaged", "destroyed", "dispensed", "disposed", "encoded",
    "expired", "in_progress", "in_transit", "inactive", "mismatch_instance", "mismatch_class",
    "mismatch_quantity", "needs_replacement", "no_pedigree_match", "non_conformant", "non_sellable_other",
    "partially_dispensed", "recalled", "reserved", "retail_sold", "returned", "sellable_accessible",
    "sellable_not_accessible", "stolen", "unavailable", "unknown",
]  # fmt: skip
# CBV business transaction types a retail flow uses, plus "order" for customer orders (OMS).
BizTransactionType = Literal["po", "desadv", "recadv", "inv", "rma", "order"]

BIZ_STEPS: tuple[str, ...] = get_args(BizStep)
DISPOSITIONS: tuple[str, ...] = get_args(Disposition)
BIZ_TRANSACTION_TYPES: tuple[str, ...] = get_args(BizTransactionType)

UOM_LENGTHS = (2, 3)


def refusal(message: str) -> PydanticCustomError:
    """A validation error whose message is exactly ``message`` (no "Value error, " prefix)."""
    return PydanticCustomError("canonical_value", message)


def _exact_decimal(value: Any) -> Any:
    if isinstance(value, float):
        raise refusal(
            f"a binary float ({value!r}) cannot carry an exact quantity; give a string, an int or a Decimal"
        )
    return value


def _gtin(value: Any) -> str:
    try:
        return normalize_gtin(value)
    except ValueError as error:
        raise refusal(str(error)) from None


def _location(value: str) -> str:
    try:
        return check_gln_if_numeric(value)
    except ValueError as error:
        raise refusal(str(error)) from None


def _uom(value: Any) -> str:
    code = value.strip().upper() if isinstance(value, str) else ""
    if len(code) not in UOM_LENGTHS or not code.isascii() or not code.isalnum():
        raise refusal(
            f"{value!r} is not a UN/ECE Recommendation 20 unit code: expected 2-3 letters or digits"
            " such as EA, KGM, LTR, MTR"
        )
    return code


def _currency(value: Any) -> str:
    code = value.strip().upper() if isinstance(value, str) else ""
    if len(code) != 3 or not code.isascii() or not code.isalpha():
        raise refusal(f"{value!r} is not an ISO 4217 currency code: expected 3 letters such as USD, EUR")
    return code


def _cbv_word(vocabulary: tuple[str, ...], urn_kind: str, uri_kind: str, what: str) -> Callable[[Any], str]:
    """A normaliser taking a CBV word bare, as URN or as GS1 web URI, to the bare lowercase word."""
    prefixes = (
        f"urn:epcglobal:cbv:{urn_kind}:",
        f"https://ref.gs1.org/cbv/{uri_kind}-".lower(),
        f"http://ref.gs1.org/cbv/{uri_kind}-".lower(),
    )

    def normalise(value: Any) -> str:
        word = value.strip().lower() if isinstance(value, str) else ""
        for prefix in prefixes:
            if word.startswith(prefix):
                word = word.removeprefix(prefix)
                break
        if word not in vocabulary:
            raise refusal(
                f"{value!r} is not a CBV {what}; expected one of {', '.join(vocabulary)}"
                f" (bare, as urn:epcglobal:cbv:{urn_kind}:WORD or as https://ref.gs1.org/cbv/{uri_kind}-WORD)"
            )
        return word

    return normalise


Text = Annotated[str, Field(min_length=1)]
Quantity = Annotated[Decimal, BeforeValidator(_exact_decimal), Field(allow_inf_nan=False)]
NonNegativeQuantity = Annotated[Quantity, Field(ge=0)]
Gtin = Annotated[str, BeforeValidator(_gtin), Field(pattern=r"^[0-9]{14}$")]
LocationCode = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_location)]
UnitCode = Annotated[str, BeforeValidator(_uom), Field(pattern=r"^[A-Z0-9]{2,3}$")]
CurrencyCode = Annotated[str, BeforeValidator(_currency), Field(pattern=r"^[A-Z]{3}$")]
BizStepWord = Annotated[BizStep, BeforeValidator(_cbv_word(BIZ_STEPS, "bizstep", "BizStep", "business step"))]
DispositionWord = Annotated[
    Disposition, BeforeValidator(_cbv_word(DISPOSITIONS, "disp", "Disp", "disposition"))
]
BizTransactionWord = Annotated[
    BizTransactionType,
    BeforeValidator(_cbv_word(BIZ_TRANSACTION_TYPES, "btt", "BTT", "business transaction type")),
]
