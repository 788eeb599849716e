"""Benchmark: memory of ingesting a large POS file, to check that file sources stream.

Writes a POS CSV of --mib MiB, then runs the file source's real ingest path on it (the check pass,
then chunking into ingress messages encoded exactly as they are published) with a sink that drops
each encoded message instead of sending it. Prints the file size, records/s and the process's peak
RSS before and after, so flat memory shows as a peak that does not grow with the file.

Usage: .venv/bin/python bench/file_memory.py [--mib 1024] [--chunk 500]
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
from router.broker import encode_body
from router.ingress import chunk_message

ROW = "T{n:09d},R1,1,SKU-{sku:05d},S00{store},{qty},2026-11-24 09:{m:02d}:{s:02d}\n"


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        path = Path(folder) / "pos-large.csv"
        rows = write_file(path, args.mib)
        before = peak_rss_mib()
        published = {"messages": 0, "bytes": 0}

        def discard(chunk: SourceChunk) -> None:
            body = encode_body(chunk_message(chunk))
            published["messages"] += 1
            published["bytes"] += len(body)

        started = time.perf_counter()
        progress = publish_file(
            path, FileParsing("pos-sales", "file", "csv", "rows", args.chunk), discard, FileProgress()
        )
        elapsed = time.perf_counter() - started
        size = path.stat().st_size / 2**20
    print(f"file                      : {size:,.0f} MiB, {rows:,} rows")
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
