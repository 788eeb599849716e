"""`router test`: route unit tests, an input fixture in, the expected canonical events out.

A test file names a ``route`` and its ``cases``; each case gives an ``input`` (``content:`` inline or
``file:`` relative to the test file, optional ``name:`` for the file name the source would see) and
``expect`` (partial canonical events matched in order on the fields given, plus optional ``targets``:
where the event is routed) and/or ``expect_deadletters: N``. The input goes through the same parser,
chunking and transform as in production, with no broker and no target.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from connectors.chunks import SourceChunk
from connectors.file_ingest import FileParsing, FileProgress, publish_file
from router.assembly import build_pipelines, csv_dialect, fixed_layout
from router.config import RouterConfig
from router.ingress import chunk_message
from router.pipeline import RoutePipeline, TransformResult
from transforms.parsers import FileFormatError

DEFAULT_PATTERN = "tests/routes/*.yaml"


class CaseInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    file: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CaseInput:
        if (self.content is None) == (self.file is None):
            raise ValueError("give exactly one of content: (inline) or file: (a path)")
        return self


class RouteCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    input: CaseInput
    expect: list[dict[str, Any]] | None = None
    expect_deadletters: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _expects_something(self) -> RouteCase:
        if self.expect is None and self.expect_deadletters is None:
            raise ValueError(f"case {self.name!r} expects nothing; give expect: and/or expect_deadletters:")
        return self


class RouteTestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    route: str
    cases: list[RouteCase] = Field(min_length=1)


class RouteTestFileError(ValueError):
    """A test file cannot be read or does not have the expected shape."""


@dataclass
class CaseResult:
    """The outcome of one case: passed when ``differences`` is empty."""

    file: Path
    case: str
    differences: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.differences


def load_test_file(path: Path) -> RouteTestFile:
    """Parse one test file; raises RouteTestFileError naming the file and the problem."""
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        return RouteTestFile.model_validate(data)
    except (OSError, YAMLError) as error:
        raise RouteTestFileError(f"{path}: cannot be read: {error}") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or 'file'}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        raise RouteTestFileError(f"{path}: {problems}") from None


def run_test_file(config: RouterConfig, path: Path) -> list[CaseResult]:
    """Run every case of one file against the route it names."""
    spec = load_test_file(path)
    try:
        route = config.route(spec.route)
    except KeyError as error:
        raise RouteTestFileError(f"{path}: {error.args[0]}") from None
    pipeline = build_pipelines(config, [route])[route.name]
    parsing = FileParsing(
        route.name,
        route.source.type,
        route.format,
        route.records,
        route.chunk_size,
        csv_dialect(route),
        fixed_layout(route),
    )
    return [_run_case(pipeline, parsing, path, case) for case in spec.cases]


def _run_case(pipeline: RoutePipeline, parsing: FileParsing, path: Path, case: RouteCase) -> CaseResult:
    result = CaseResult(path, case.name)
    chunks: list[SourceChunk] = []
    name = case.input.name or (Path(case.input.file).name if case.input.file else f"case.{parsing.format}")
    with tempfile.TemporaryDirectory(prefix="router-test-") as folder:
        staged = Path(folder) / name
        if case.input.file is not None:
            source = path.parent / case.input.file
            try:
                staged.write_bytes(source.read_bytes())
            except OSError as error:
                result.differences.append(f"input file {source} cannot be read: {error}")
                return result
        else:
            # Inline content is text: store it the way the route's files are encoded.
            staged.write_text(case.input.content or "", encoding=parsing.encoding)
        try:
            publish_file(staged, parsing, chunks.append, FileProgress(), name=name)
        except FileFormatError as error:
            result.differences.append(f"the input does not parse, the whole file would be rejected: {error}")
            return result
    outcome = TransformResult()
    routed: dict[str, list[str]] = {}
    events: list[dict[str, Any]] = []
    for chunk in chunks:
        transformed = pipeline.transform(chunk_message(chunk))
        outcome.failures.extend(transformed.failures)
        for (target, _), batch in transformed.batches.items():
            for event in batch:
                routed.setdefault(event["event_id"], []).append(target)
        events.extend(transformed.accepted)
    if case.expect is not None:
        result.differences.extend(compare_events(case.expect, events, routed))
    if case.expect_deadletters is not None and case.expect_deadletters != len(outcome.failures):
        letters = "".join(f"\n    {failure.reason}: {failure.detail}" for failure in outcome.failures)
        result.differences.append(
            f"expected {case.expect_deadletters} dead letter(s), got {len(outcome.failures)}{letters}"
        )
    return result


def compare_events(
    expected: Sequence[Mapping[str, Any]],
    actual: Sequence[Mapping[str, Any]],
    routed: Mapping[str, list[str]],
) -> list[str]:
    """Differences between partial expected events and the actual ones, in order; ``routed`` maps an
    event id to the targets it went to (for an expected ``targets``)."""
    differences: list[str] = []
    if len(expected) != len(actual):
        differences.append(f"expected {len(expected)} event(s), got {len(actual)}")
    for index, (want, got) in enumerate(zip(expected, actual, strict=False), start=1):
        for key, value in want.items():
            if key == "targets":
                have: Any = sorted(routed.get(str(got.get("event_id")), []))
                value = sorted(value) if isinstance(value, list) else value
            else:
                have = got.get(key)
            for where, wanted, found in _mismatches(key, value, have):
                differences.append(f"event {index}: {where}: expected {wanted!r}, got {found!r}")
    for index, extra in enumerate(actual[len(expected) :], start=len(expected) + 1):
        differences.append(f"event {index} was not expected: {dict(extra)}")
    return differences


def _mismatches(where: str, wanted: Any, found: Any) -> list[tuple[str, Any, Any]]:
    """Differences between a partial expected value and the actual one (dicts compare on given keys)."""
    if isinstance(wanted, Mapping) and isinstance(found, Mapping):
        return [
            m for key, value in wanted.items() for m in _mismatches(f"{where}.{key}", value, found.get(key))
        ]
    if _same(wanted, found):
        return []
    return [(where, wanted, found)]


def _same(wanted: Any, found: Any) -> bool:
    """Equal, with numbers compared by value: YAML `2` matches the event's exact decimal string "2.0"."""
    if wanted == found:
        return True
    if isinstance(wanted, int | float | Decimal) and not isinstance(wanted, bool) and isinstance(found, str):
        try:
            return Decimal(str(wanted)) == Decimal(found)
        except InvalidOperation:
            return False
    return False
