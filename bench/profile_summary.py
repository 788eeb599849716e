"""Summarise a py-spy profile (``--threads --format raw``) of the router by stage.

A stage is a thread name with its partition number taken off (``transform``, ``partition:erp``,
``file:pos-sales``, ...). For each stage: its share of all samples, then its top functions by
cumulative share of the stage's samples (a function counts once per stack,
callees included; its lines are taken together unless ``--by-line``).

Usage: .venv/bin/python bench/profile_summary.py PROFILE [--top 15] [--by-line] [--skip TEXT ...]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

THREAD_FRAME = re.compile(r"^thread \(\d+\):? ?(?P<name>.*)$")
PARTITION_NUMBER = re.compile(r"(-\d+|:\d+:[0-9a-f]+)$")  # a partition, or a member's pid:token
LINE_NUMBER = re.compile(r":\d+\)$")


def stage_of(thread_frame: str) -> str:
    """The stage a thread belongs to: its name without a trailing partition number or process id."""
    match = THREAD_FRAME.match(thread_frame)
    name = match.group("name") if match else thread_frame
    return PARTITION_NUMBER.sub("", name) or "unnamed"


def summarise(lines: list[str], top: int, *, by_line: bool = False, skip: tuple[str, ...] = ()) -> str:
    samples: Counter[str] = Counter()
    cumulative: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        stage = stage_of(frames[0])
        samples[stage] += int(count)
        for function in {frame if by_line else LINE_NUMBER.sub(")", frame) for frame in frames[1:]}:
            cumulative[stage][function] += int(count)
    total = sum(samples.values()) or 1
    report = [f"{total} samples"]
    for stage, count in samples.most_common():
        report.append(f"\n## {stage}: {count} samples, {100 * count / total:.1f}% of all")
        shown = [(f, hits) for f, hits in cumulative[stage].most_common() if not any(t in f for t in skip)]
        for function, hits in shown[:top]:
            report.append(f"  {100 * hits / count:5.1f}%  {function}")
    return "\n".join(report)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--by-line", action="store_true", help="one entry per line, not per function")
    parser.add_argument("--skip", nargs="*", default=(), help="leave out functions whose entry contains this")
    args = parser.parse_args()
    lines = args.profile.read_text().splitlines()
    print(summarise(lines, args.top, by_line=args.by_line, skip=tuple(args.skip)))


if __name__ == "__main__":
    main()
