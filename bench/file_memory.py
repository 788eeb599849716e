"""Benchmark: memory of ingesting a large file, to check that file sources stream.

Writes a POS CSV (or, with --format xml, a despatch advice: one header, then packages of lines) of
--mib MiB, then runs the file source's real ingest path on it (the check pass, then chunking into
ingress messages encoded exactly as they are published, each XML line with its header as document
context) with a sink that drops each encoded message instead of sending it. Prints the file size,
records/s and the process's peak RSS before and after, so flat memory shows as a peak that does not
grow with the file.

Usage: .venv/bin/python bench/file_memory.py [--mib 1024] [--chunk 500] [--format csv|xml]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.chunks import SourceChunk
from connectors.file_ingest import FileParsing, FileProgress, publish_file
from router.ingress import chunk_message
from router.messages import encode_body

ROW = "T{n:09d},R1,1,SKU-{sku:05d},S00{store},{qty},2026-11-24 09:{m:02d}:{s:02d}\n"
XML_HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<DespatchAdvice number="ASN-BENCH-1" issued="2026-11-24T05:55:00Z">
  <Supplier gln="4012345000009">Bench supplier</Supplier>
  <ShipTo gln="0614141000012">Downtown flagship</ShipTo>
  <Dates shipped="2026-11-24T06:30:00Z" expected="2026-11-25T08:00:00Z"/>
"""
XML_LINE = '    <Line no="{n}"><GTIN>04012345000016</GTIN><Qty unit="EA">{qty}</Qty></Line>\n'
LINES_PER_PACKAGE = 200


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_file(path: Path, mib: int) -> int:
    """A POS export of about ``mib`` MiB; returns its row count."""
    target = mib * 2**20
    rows = 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write("TXN,REGISTER,LINE,SKU,STORE,QTY,SOLD_AT\n")
        while handle.tell() < target:
            block = "".join(
                ROW.format(
                    n=rows + i, sku=(rows + i) % 5000, store=1 + i % 5, qty=1 + i % 4, m=i % 60, s=i % 59
                )
                for i in range(10_000)
            )
            handle.write(block)
            rows += 10_000
    return rows


def write_xml_file(path: Path, mib: int) -> int:
    """A despatch advice of about ``mib`` MiB: one header, packages of lines; returns its line count."""
    target = mib * 2**20
    lines = 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write(XML_HEADER)
        while handle.tell() < target:
            package = "".join(XML_LINE.format(n=lines + i, qty=1 + i % 9) for i in range(LINES_PER_PACKAGE))
            handle.write(f'  <Package sscc="34012345{lines:010d}">\n{package}  </Package>\n')
            lines += LINES_PER_PACKAGE
        handle.write("</DespatchAdvice>\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--format", choices=("csv", "xml"), default="csv")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        if args.format == "xml":
            path = Path(folder) / "desadv-large.xml"
            rows = write_xml_file(path, args.mib)
            parsing = FileParsing("supplier-asn", "file", "xml", "/DespatchAdvice/Package/Line", args.chunk)
        else:
            path = Path(folder) / "pos-large.csv"
            rows = write_file(path, args.mib)
            parsing = FileParsing("pos-sales", "file", "csv", "rows", args.chunk)
        before = peak_rss_mib()
        published = {"messages": 0, "bytes": 0}

        def discard(chunk: SourceChunk) -> None:
            body = encode_body(chunk_message(chunk))
            published["messages"] += 1
            published["bytes"] += len(body)

        started = time.perf_counter()
        progress = publish_file(path, parsing, discard, FileProgress())
        elapsed = time.perf_counter() - started
        size = path.stat().st_size / 2**20
    print(
        f"file                      : {size:,.0f} MiB, {rows:,} {'lines' if args.format == 'xml' else 'rows'}"
    )
    rate = progress.records / elapsed
    encoded = published["bytes"] / 2**20
    print(
        f"ingested                  : {progress.records:,} records in {published['messages']:,} messages "
        f"({encoded:,.0f} MiB encoded) in {elapsed:.1f}s = {rate:,.0f} records/s"
    )
    print(f"peak RSS before ingest    : {before:,.1f} MiB")
    peak = peak_rss_mib()
    print(f"peak RSS after ingest     : {peak:,.1f} MiB  (the file is {size / peak:.1f}x that)")


if __name__ == "__main__":
    main()
