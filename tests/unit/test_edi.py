"""X12 and EDIFACT readers: delimiters from ISA/UNA, release characters, loops, control numbers and counts."""

from __future__ import annotations

import io
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.file_ingest import FileParsing, FileProgress, publish_file
from router.cli import main
from router.ingress import chunk_message
from router.pipeline import DeliveryRule, RoutePipeline
from transforms.mapping import compile_mapping
from transforms.parsers import FileFormatError, RawRecord, check_records_path, iter_records

SAMPLES = Path(__file__).parents[1] / "routes" / "edi"
ISA = "ISA*00*          *00*          *ZZ*ACMESUPPLY     *ZZ*RETAILCO       *261130*0915*^*00501*{icn}*0*P*>~"


def x12(*bodies: list[str], icn: str = "000000001", sep: str = "~\n", isa: str = ISA) -> bytes:
    """An 856 interchange of one group holding a transaction per body, every count right."""
    segments = [isa.format(icn=icn).rstrip("~"), "GS*SH*ACMESUPPLY*RETAILCO*20261130*0915*7*X*005010"]
    for number, body in enumerate(bodies, start=1):
        control = f"{number:04d}"
        segments += [f"ST*856*{control}", *body, f"SE*{len(body) + 2}*{control}"]
    segments += [f"GE*{len(bodies)}*7", f"IEA*1*{icn}"]
    return (sep.join(segments) + sep).encode()


ASN_BODY = [
    "BSN*00*ASN-1*20261130*0915",
    "HL*1**S",
    "N1*ST*DC East*UL*0614141000036",
    "HL*2*1*O",
    "PRF*PO-1",
    "HL*3*2*I",
    "LIN*1*UP*012345678905",
    "SN1**4*EA",
    "HL*4*2*I",
    "LIN*2*UP*036000291452",
    "SN1**2*EA",
    "CTT*4",
]


def edifact(lines: list[str], *, una: str = "UNA:+.? '", syntax: str = "UNOC") -> bytes:
    """A DESADV interchange around ``lines`` (the message body), every count right."""
    body = ["UNH+1+DESADV:D:96A:UN", *lines]
    segments = [f"UNB+{syntax}:3+SENDER:14+RECEIVER:14+261130:0915+REF1", *body, f"UNT+{len(body) + 1}+1"]
    segments.append("UNZ+1+REF1")
    return ((una + "\n" if una else "") + "'\n".join(segments) + "'\n").encode("utf-8")


DESADV_BODY = [
    "BGM+351+DES-1+9",
    "NAD+DP+0614141000036::9",
    "CPS+1",
    "GIN+BJ+006141410000000017",
    "LIN+1++4006381333931:SRV",
    "QTY+12:24",
    "LIN+2++5901234123457:SRV",
    "QTY+12:10",
    "CNT+2:2",
]


def records(content: bytes, fmt: str, spec: str, name: str = "in.edi") -> list[RawRecord]:
    return list(iter_records(io.BytesIO(content), fmt, spec, name))  # type: ignore[arg-type]


def rejection(content: bytes, fmt: str, spec: str, name: str = "in.edi") -> str:
    with pytest.raises(FileFormatError) as caught:
        records(content, fmt, spec, name)
    return str(caught.value)


# Delimiters


def test_x12_delimiters_come_from_the_isa_element_repetition_component_and_terminator() -> None:
    isa = ISA.replace("*", "|").replace("|^|", "|!|").replace("|>~", "|\\\r")
    body = ["BSN|00|ASN-1|20261130|0915", "HL|1||S", "HL|2|1|I", "LIN|1|UP|012345678905", "REF|ZZ|A\\B!C\\D"]
    content = x12(body, isa=isa, sep="\r").replace(b"*", b"|").replace(b"~", b"")
    [record] = records(content, "x12", "HL:I")
    assert record.error is None, record.error
    assert record.data["REF"] == [
        {"e1": "ZZ", "e2": "A", "e2_1": "A", "e2_2": "B", "r2": [["A", "B"], ["C", "D"]]}
    ]
    assert record.data["header"]["BSN"][0]["e2"] == "ASN-1"


def test_x12_before_00402_has_no_repetition_separator_so_isa11_is_plain_text() -> None:
    isa = ISA.replace("*^*00501*", "*U*00401*")
    [record] = records(x12(["HL*1**I", "LIN*1*UP*012345678905", "REF*ZZ*U^1"], isa=isa), "x12", "HL:I")
    assert record.data["REF"][0]["e2"] == "U^1"


@pytest.mark.parametrize(
    ("isa", "reason"),
    [
        ("ISA*00*short~", "ISA is 106 characters long"),
        (ISA.replace("*00501*", "*0501*"), "16 elements"),
        (ISA.replace("*>~", "*~~"), "not distinct"),
        (ISA.replace("*>~", "*>A"), "cannot be a letter"),
        ("GS*SH*A*B~" + " " * 120, "starts with ISA, not 'GS*'"),
    ],
)
def test_a_broken_isa_rejects_the_file_naming_segment_1(isa: str, reason: str) -> None:
    message = rejection(isa.format(icn="000000001").encode() + b"GS*SH~", "x12", "HL:I", "bad.x12")
    assert message.startswith("bad.x12: segment 1 (ISA): ") and reason in message, message


def test_edifact_una_sets_the_delimiters_and_the_release_character() -> None:
    content = (
        "UNA#*.| ~\n"
        "UNB*UNOC#3*S#14*R#14*261130#0915*REF1~\n"
        "UNH*1*DESADV#D#96A#UN~\n"
        "BGM*351*DES|*1*9~\n"
        "CPS*1~\n"
        "LIN*1**5901234123457#SRV~\n"
        "IMD*F**|*star |#colon ||bar |~end~\n"
        "UNT*6*1~\n"
        "UNZ*1*REF1~\n"
    ).encode("ascii")
    [record] = records(content, "edifact", "CPS/LIN")
    assert record.error is None, record.error
    assert record.data["header"]["BGM"][0]["e2"] == "DES*1"
    assert record.data["IMD"][0]["e3"] == "*star #colon |bar ~end"
    assert record.data["LIN"][0]["e3_2"] == "SRV"


def test_edifact_without_una_uses_the_default_delimiters_and_question_mark_release() -> None:
    content = edifact(["BGM+351+DES?+1+9", "CPS+1", "LIN+1++5901234123457:SRV", "FTX+AAA+++it?'s 2?:1 ?? ok"])
    [record] = records(content, "edifact", "CPS/LIN", "x.edi")
    assert record.data["header"]["BGM"][0]["e2"] == "DES+1"
    assert record.data["FTX"][0]["e4"] == "it's 2:1 ? ok"


def test_edifact_una_with_a_space_release_character_has_none() -> None:
    content = edifact(["BGM+351+WHY?+9", "CPS+1", "LIN+1++5901234123457:SRV"], una="UNA:+.  '")
    [record] = records(content, "edifact", "LIN")
    assert record.data["header"]["BGM"][0]["e2"] == "WHY?"


def test_edifact_text_is_decoded_in_the_charset_of_the_unb_syntax_identifier() -> None:
    content = edifact(["BGM+351+Grüße+9", "LIN+1++5901234123457:SRV"], syntax="UNOW")
    [record] = records(content, "edifact", "LIN")
    assert record.data["header"]["BGM"][0]["e2"] == "Grüße"
    ascii_only = rejection(content.replace(b"UNOW", b"UNOA"), "edifact", "LIN")
    assert "segment 4 (BGM): byte 0xc3 is not valid ascii" in ascii_only
    assert "'UNOQ' is not one the router reads" in rejection(
        content.replace(b"UNOW", b"UNOQ"), "edifact", "LIN"
    )


def test_x12_text_that_is_not_utf8_rejects_the_file_naming_the_segment() -> None:
    content = x12(["HL*1**I", "LIN*1*UP*012345678905"]).replace(b"LIN*1*UP*", b"LIN*1*\xe9*")
    assert "segment 5 (LIN): byte 0xe9 is not valid utf-8" in rejection(content, "x12", "HL:I")


# Loops: one record per item, with the header and the enclosing loops


def test_an_856_item_loop_carries_its_header_shipment_order_and_envelope() -> None:
    first, second = records(x12(ASN_BODY, icn="000004711"), "x12", "HL:I")
    assert first.error is None and second.error is None
    assert first.data["LIN"][0]["e3"] == "012345678905" and second.data["SN1"][0]["e2"] == "2"
    assert second.data["header"]["BSN"][0]["e2"] == "ASN-1"
    assert second.data["shipment"]["N1"][0]["e4"] == "0614141000036"
    assert second.data["order"]["PRF"][0]["e1"] == "PO-1"
    envelope = second.data["envelope"]
    assert {
        k: envelope[k] for k in ("sender", "receiver", "interchange", "transaction", "line", "segment")
    } == {
        "sender": "ZZ:ACMESUPPLY",
        "receiver": "ZZ:RETAILCO",
        "interchange": "000004711",
        "transaction": "0001",
        "line": 2,
        "segment": 12,
    }
    assert envelope["GS"][0]["e1"] == "SH" and "CTT" not in second.data  # summary segments are not mapped
    assert [r.number for r in (first, second)] == [1, 2]


def test_an_hl_whose_parent_is_not_an_enclosing_loop_dead_letters_the_transaction_naming_it() -> None:
    body = [line if line != "HL*4*2*I" else "HL*4*9*I" for line in ASN_BODY]
    found = records(x12(body, ASN_BODY), "x12", "HL:I")
    assert [r.error is None for r in found] == [False, True, True]
    assert "segment 12 (HL): HL02 parent '9' is not an enclosing HL loop" in str(found[0].error)


def test_edifact_cps_groups_enclose_their_lin_lines() -> None:
    first, second = records(edifact(DESADV_BODY), "edifact", "CPS/LIN")
    assert second.data["cps"]["GIN"][0]["e2"] == "006141410000000017"
    assert second.data["QTY"][0]["e1_2"] == "10" and "CNT" not in second.data
    assert first.data["header"]["NAD"][0]["e2"] == "0614141000036"
    assert second.data["envelope"]["type"] == "DESADV" and second.data["envelope"]["interchange"] == "REF1"


@pytest.mark.parametrize(
    ("fmt", "spec", "reason"),
    [
        ("x12", None, "records is required for x12"),
        ("x12", "HL:", "must be HL:<level code> or segment tags"),
        ("edifact", "HL:I", "HL loops are X12"),
        ("edifact", "CPS/lin", "segment tags joined by '/'"),
        ("edifact", "LIN/LIN", "repeats a tag"),
    ],
)
def test_records_for_edi_is_checked_when_the_config_is(fmt: str, spec: str | None, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_records_path(fmt, spec)


# Control numbers and counts


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (
            "IEA*1*000000001",
            "IEA*1*000000002",
            "segment 18 (IEA): IEA02 '000000002' does not match segment 1",
        ),
        ("IEA*1*", "IEA*2*", "segment 18 (IEA): IEA01 says 2 functional groups, counted 1"),
        ("GE*1*7", "GE*1*8", "segment 17 (GE): GE02 '8' does not match segment 2 (GS)'s GS06 '7'"),
        ("GE*1*7", "GE*3*7", "segment 17 (GE): GE01 says 3 transaction sets, counted 1"),
        (
            "IEA*1*000000001~\n",
            "",
            "segment 1 (ISA): this interchange has no IEA: the file ends after segment 17",
        ),
        ("SE*14*0001~\n", "", "segment 16 (GE): GE out of place: segment 3 (ST) has no SE"),
        ("ST*856*0001~\n", "", "segment 3 (BSN): is outside a transaction set"),
        ("IEA*1*000000001~\n", "IEA*1*000000001", "segment 18: the file ends inside a segment"),
    ],
)
def test_an_envelope_mismatch_rejects_the_file_naming_the_segment(old: str, new: str, reason: str) -> None:
    content = x12(ASN_BODY)
    assert old.encode() in content
    message = rejection(content.replace(old.encode(), new.encode(), 1), "x12", "HL:I", "asn.x12")
    assert message.startswith("asn.x12: ") and reason in message, message


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("SE*14*0001", "SE*13*0001", "segment 16 (SE): SE01 says 13 segments, counted 14 from ST to SE"),
        (
            "SE*14*0001",
            "SE*14*0009",
            "segment 16 (SE): SE02 '0009' does not match segment 3 (ST)'s ST02 '0001'",
        ),
        ("SE*14*0001", "SE*x*0001", "segment 16 (SE): SE01 (number of segments) is 'x', not a number"),
        ("CTT*4", "CTT*2", "segment 15 (CTT): says 2 HL loops, counted 4"),
    ],
)
def test_a_transaction_mismatch_dead_letters_its_records_naming_the_segment(
    old: str, new: str, reason: str
) -> None:
    content = x12(ASN_BODY, ASN_BODY).replace(old.encode(), new.encode(), 1)
    found = records(content, "x12", "HL:I")
    assert [r.number for r in found] == [1, 2, 3, 4]
    assert found[0].error == found[1].error and found[2].error is None and found[3].error is None
    assert reason in str(found[0].error) and "transaction set '0001' (segment 3 (ST))" in str(found[0].error)


def test_x12_846_ctt_counts_lin_loops() -> None:
    body = ["BIA*00*MM*INV-1*20261130", "LIN*1*UP*012345678905", "QTY*17*4", "LIN*2*UP*036000291452", "CTT*3"]
    found = records(x12(body), "x12", "LIN")
    assert "segment 8 (CTT): says 3 LIN line items, counted 2" in str(found[0].error)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("UNZ+1+REF1", "UNZ+1+REF2", "segment 14 (UNZ): UNZ02 'REF2' does not match segment 2 (UNB)'s"),
        ("UNZ+1+", "UNZ+2+", "segment 14 (UNZ): UNZ01 says 2 messages, counted 1"),
        ("UNZ+1+REF1'\n", "", "the file ends after segment 13: segment 2 (UNB) has no UNZ"),
        ("UNT+11+1'\nUNZ", "UNZ", "segment 13 (UNZ): UNZ out of place: segment 3 (UNH) has no UNT"),
        ("UNH+1+DESADV", "UNH+1+DESADV'\nUNA:+.? ", "segment 4 (UNA): UNA may only be the first segment"),
        ("UNT+11+1'\n", "UNT+11+1'\nFTX+AAA'\n", "segment 14 (FTX): is outside a message"),
    ],
)
def test_an_edifact_envelope_mismatch_rejects_the_file_naming_the_segment(
    old: str, new: str, reason: str
) -> None:
    content = edifact(DESADV_BODY)
    assert old.encode() in content
    message = rejection(content.replace(old.encode(), new.encode(), 1), "edifact", "CPS/LIN", "d.edi")
    assert message.startswith("d.edi: ") and reason in message, message


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("UNT+11+1", "UNT+12+1", "segment 13 (UNT): UNT01 says 12 segments, counted 11 from UNH to UNT"),
        (
            "UNT+11+1",
            "UNT+11+2",
            "segment 13 (UNT): UNT02 '2' does not match segment 3 (UNH)'s message reference",
        ),
        ("CNT+2:2", "CNT+2:5", "segment 12 (CNT): says 5 LIN line items, counted 2"),
    ],
)
def test_an_edifact_message_mismatch_dead_letters_its_lines_naming_the_segment(
    old: str, new: str, reason: str
) -> None:
    found = records(edifact(DESADV_BODY).replace(old.encode(), new.encode(), 1), "edifact", "CPS/LIN")
    assert len(found) == 2 and found[0].error == found[1].error
    assert reason in str(found[0].error) and "message '1' (segment 3 (UNH))" in str(found[0].error)


def test_a_message_without_summary_keeps_its_last_line_when_its_trailer_is_wrong() -> None:
    body = [line for line in DESADV_BODY if not line.startswith("CNT")]
    found = records(edifact(body).replace(b"UNT+10+1", b"UNT+9+1"), "edifact", "CPS/LIN")
    assert [r.data["LIN"][0]["e1"] for r in found] == ["1", "2"]
    assert all("UNT01 says 9 segments, counted 10" in str(r.error) for r in found)


def test_edifact_groups_are_counted_by_une_and_unz() -> None:
    content = edifact(DESADV_BODY).replace(b"UNH+", b"UNG+DESADV+S+R+261130:0915+G1'\nUNH+", 1)
    content = content.replace(b"UNZ+1+", b"UNE+1+G1'\nUNZ+1+")
    assert len(records(content, "edifact", "LIN")) == 2
    bad = content.replace(b"UNE+1+G1", b"UNE+1+G2")
    assert "UNE02 'G2' does not match segment 3 (UNG)'s 'G1'" in rejection(bad, "edifact", "LIN")


# Event ids


def _pipeline(fmt: str) -> RoutePipeline:
    spec: dict[str, Any] = {
        "type": "asn",
        "asn_id": {"path": "header.BSN[0].e2"},
        "gtin": {"path": "LIN[0].e3"},
        "location": "0614141000036",
        "quantity": {"path": "SN1[0].e2", "as": "decimal"},
        "occurred_at": "2026-11-30T09:15:00+00:00",
    }
    return RoutePipeline(
        "asn", compile_mapping(spec, fmt, {}), ["gtin", "location"], [DeliveryRule("wms", 1)]
    )


def _event_ids(path: Path, name: str) -> list[str]:
    chunks: list[Any] = []
    parsing = FileParsing("asn", "sftp", "x12", "HL:I", 500)
    publish_file(path, parsing, chunks.append, FileProgress(), name=name)
    result = [_pipeline("x12").transform(chunk_message(chunk)) for chunk in chunks]
    assert not any(r.failures for r in result), [r.failures for r in result]
    return [event["event_id"] for r in result for event in r.accepted]


def test_event_ids_come_from_the_interchange_control_number_not_the_file(tmp_path: Path) -> None:
    first = tmp_path / "a.x12"
    first.write_bytes(x12(ASN_BODY, icn="000004711"))
    resent = tmp_path / "b.x12"
    resent.write_bytes(x12(ASN_BODY, icn="000004711").replace(b"*261130*0915*", b"*261201*0600*"))
    next_one = tmp_path / "c.x12"
    next_one.write_bytes(x12(ASN_BODY, icn="000004712"))
    ids = _event_ids(first, "a.x12")
    assert len(set(ids)) == 2
    assert _event_ids(resent, "b.x12") == ids  # the same interchange sent again deduplicates
    assert set(_event_ids(next_one, "c.x12")).isdisjoint(ids)


def test_a_line_that_does_not_map_is_dead_lettered_naming_its_file_segment_record_and_field(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.x12"
    path.write_bytes(x12(ASN_BODY).replace(b"LIN*2*UP*036000291452", b"LIN*2*UP*036000291453"))
    chunks: list[Any] = []
    publish_file(path, FileParsing("asn", "sftp", "x12", "HL:I", 500), chunks.append, FileProgress())
    [result] = [_pipeline("x12").transform(chunk_message(chunk)) for chunk in chunks]
    assert [event["source"]["segment"] for event in result.accepted] == [9]
    [failure] = result.failures
    assert failure.reason == "validation"
    assert failure.detail.startswith("a.x12 segment 12 (record 2): field 'gtin': ")
    assert failure.payload["LIN"][0]["e3"] == "036000291453"  # the record as read, for an edit and a replay


def test_the_sample_interchanges_parse() -> None:
    expected = {"asn-856.x12": 3, "stock-846.x12": 2, "desadv.edi": 3, "invrpt.edi": 2}
    specs = {"asn-856.x12": "HL:I", "stock-846.x12": "LIN", "desadv.edi": "CPS/LIN", "invrpt.edi": "LIN"}
    for name, count in expected.items():
        fmt = "x12" if name.endswith(".x12") else "edifact"
        found = records((SAMPLES / name).read_bytes(), fmt, specs[name], name)
        assert len(found) == count and all(r.error is None for r in found), (name, found)


def test_the_edi_route_fixtures_pass_through_router_test() -> None:
    root = Path(__file__).parents[2]
    sample = CliRunner().invoke(
        main, ["test", "-c", str(root / "routes.yaml"), str(root / "tests/routes/supplier-asn-x12.yaml")]
    )
    assert sample.exit_code == 0, sample.output
    edi = sorted(str(path) for path in SAMPLES.glob("*.yaml"))
    result = CliRunner().invoke(main, ["test", "-c", str(SAMPLES / "config.yml"), *edi])
    assert result.exit_code == 0, result.output
    assert "7 passed, 0 failed" in result.output


# Hostile interchanges: never a crash; a rejection names a segment, or records come out.

_NOISE = st.sampled_from(list(b"~*>^:+'?|\n\r UNHTSEGIALB0123456789\x00\xff\xc3"))
_SEEDS = [
    x12(ASN_BODY),
    edifact(DESADV_BODY),
    *(path.read_bytes() for path in sorted(SAMPLES.iterdir()) if path.suffix in (".x12", ".edi")),
]


@st.composite
def _hostile(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return bytes(draw(st.lists(_NOISE, max_size=300)))
    content = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(content)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "cut"]))
        if action == "insert":
            content[at:at] = bytes([draw(_NOISE)])
        elif action == "delete":
            del content[at : at + draw(st.integers(1, 20))]
        elif action == "replace" and at < len(content):
            content[at] = draw(_NOISE)
        elif action == "cut":
            del content[at:]
    return bytes(content)


_NAMES_A_SEGMENT = re.compile(r"segment \d+|the file has no segments")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=_hostile(),
    fmt=st.sampled_from(["x12", "edifact"]),
    spec=st.sampled_from(["HL:I", "LIN", "CPS/LIN"]),
)
def test_hostile_interchanges_are_rejected_naming_a_segment_or_yield_records(
    content: bytes, fmt: str, spec: str
) -> None:
    if fmt == "edifact" and spec == "HL:I":
        spec = "LIN"
    try:
        found = records(content, fmt, spec, "hostile")
    except FileFormatError as error:
        assert error.name == "hostile" and _NAMES_A_SEGMENT.search(error.reason), error.reason
        return
    for record in found:
        assert isinstance(record.data, dict) and "envelope" in record.data
        assert record.error is None or _NAMES_A_SEGMENT.search(record.error), record.error


# Streaming: memory follows the largest transaction, not the file.


class _GeneratedFile:
    """A read()-able file produced on the fly, so the test holds none of it."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts = parts
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            part = next(self._parts, None)
            if part is None:
                break
            self._buffer += part
        cut = len(self._buffer) if size < 0 else size
        block, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return block


def _x12_846(transactions: int) -> Iterator[bytes]:
    yield ISA.format(icn="000000001").encode() + b"\nGS*IB*A*B*20261130*2200*1*X*004010~\n"
    for number in range(1, transactions + 1):
        body = [
            b"BIA*00*MM*INV*20261130",
            *(b"LIN*%d*UP*012345678905~QTY*17*%d" % (n, n) for n in range(1, 21)),
        ]
        yield b"ST*846*%04d~\n%s~\nCTT*20~\nSE*%d*%04d~\n" % (number, b"~\n".join(body), 44, number)
    yield b"GE*%d*1~\nIEA*1*000000001~\n" % transactions


def _invrpt(transactions: int) -> Iterator[bytes]:
    yield b"UNB+UNOC:3+S:14+R:14+261130:2300+REF'\n"
    for number in range(1, transactions + 1):
        lines = b"".join(b"LIN+%d++4006381333931:SRV'QTY+145:%d'" % (n, n) for n in range(1, 21))
        yield b"UNH+%d+INVRPT:D:96A:UN'BGM+35+INV+9'%sCNT+2:20'UNT+44+%d'\n" % (number, lines, number)
    yield b"UNZ+%d+REF'\n" % transactions


def _peak_bytes(fmt: str, parts: Iterator[bytes]) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = 0
        for record in iter_records(_GeneratedFile(parts), fmt, "LIN", "big"):  # type: ignore[arg-type]
            assert record.error is None, record.error
            count += 1
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "generate"), [("x12", _x12_846), ("edifact", _invrpt)])
def test_memory_stays_flat_over_many_transactions(fmt: str, generate: Any) -> None:
    _peak_bytes(fmt, generate(5))  # the first run fills caches (codecs, regexes) that are not the file's
    count, peak = _peak_bytes(fmt, generate(400))
    assert count == 8000
    # Keeping the 8,000 records would take about 16 MiB; one transaction and one 64 KiB block at a
    # time stay under 1.5 MiB (measured: 0.9 MiB for X12, 0.4 MiB for EDIFACT).
    assert peak < 1.5 * 1024 * 1024, peak


@pytest.mark.parametrize(
    ("fmt", "content", "reason"),
    [
        (
            "x12",
            x12(["HL*1**I"]) + b"PID*F" + b"x" * 300,
            "segment 8: longer than 200 characters without '~'",
        ),
        ("edifact", edifact(["CPS+1", "FTX+AAA+++" + "x" * 300]), "segment 5: longer than 200 characters"),
    ],
)
def test_a_segment_without_end_is_refused_before_it_fills_memory(
    fmt: str, content: bytes, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("transforms.edi_segments.MAX_SEGMENT_CHARS", 200)
    assert reason in rejection(content, fmt, "LIN")
