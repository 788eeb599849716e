"""Interoperable JSON: what json.loads accepts but the router refuses, each problem with its JSON path."""

from __future__ import annotations

from decimal import Decimal

import pytest

from transforms.interop_json import MAX_DEPTH, MAX_PROBLEMS, JsonProblem, JsonRefused, loads_interoperable


def refused(body: bytes) -> list[tuple[JsonProblem, str]]:
    with pytest.raises(JsonRefused) as caught:
        loads_interoperable(body)
    return [(issue.problem, issue.path) for issue in caught.value.issues]


def test_interoperable_json_decodes_with_exact_decimals_and_surrogate_pairs() -> None:
    body = b'{"qty": 2.50, "n": -7, "big": 1.7e308, "smile": "\\ud83d\\ude00", "nested": [[{}]]}'

    assert loads_interoperable(body) == {
        "qty": Decimal("2.50"),
        "n": -7,
        "big": Decimal("1.7e308"),
        "smile": "\N{GRINNING FACE}",
        "nested": [[{}]],
    }
    assert loads_interoperable(b'{"qty": 2.5}', exact=False) == {"qty": 2.5}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": ["\\ud800"]}', [(JsonProblem.LONE_SURROGATE, "$.a[0]")]),
        (b'{"it\'s \\udc00": 1}', [(JsonProblem.LONE_SURROGATE, "$['it\\'s \\udc00']")]),
        (b'[{"k": 1, "k": 1}]', [(JsonProblem.DUPLICATE_KEY, "$[0].k")]),
        (
            b'{"q": 1e309, "r": -' + b"1" * 310 + b"}",
            [(JsonProblem.NUMBER_RANGE, "$.q"), (JsonProblem.NUMBER_RANGE, "$.r")],
        ),
        (b"[NaN, Infinity, -Infinity]", [(JsonProblem.NON_FINITE, f"$[{n}]") for n in range(3)]),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), [(JsonProblem.DEPTH, "$")]),
        (b'{"a": "\xff"}', [(JsonProblem.ENCODING, "$")]),
        (b'{"a": }', [(JsonProblem.SYNTAX, "$")]),
    ],
)
def test_each_problem_is_named_with_its_path(body: bytes, expected: list[tuple[JsonProblem, str]]) -> None:
    assert refused(body) == expected


def test_nesting_up_to_the_limit_passes_and_brackets_inside_strings_do_not_count() -> None:
    assert loads_interoperable(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert loads_interoperable(b'["' + b"[" * 500 + b'"]') == ["[" * 500]


def test_at_most_max_problems_are_listed() -> None:
    body = b"[" + b",".join([b"NaN"] * (MAX_PROBLEMS + 5)) + b"]"
    assert len(refused(body)) == MAX_PROBLEMS
