"""JMESPath conditions on canonical events: a route's ``filter`` and a delivery rule's ``when``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError


class FilterError(ValueError):
    """A condition could not be evaluated on an event (e.g. a function given the wrong type)."""


class EventPredicate:
    """A compiled JMESPath condition; events are JSON-mode dumps, so quantities are strings.

    Compare numbers with ``to_number(quantity) > `0```; a bare ``quantity > `0``` is null (false)
    because JMESPath orders only numbers.
    """

    def __init__(self, expression: str) -> None:
        self.expression = expression
        try:
            self._compiled = jmespath.compile(expression)
        except JMESPathError as error:
            raise ValueError(
                f"condition {expression!r} is not a valid JMESPath expression: {error}"
            ) from None

    def matches(self, event: Mapping[str, Any]) -> bool:
        """True when the expression's result is JMESPath-truthy (not false, null, "", [] or {})."""
        try:
            result = self._compiled.search(event)
        except JMESPathError as error:
            raise FilterError(f"condition {self.expression!r} failed on event: {error}") from None
        return is_truthy(result)

    def __repr__(self) -> str:
        return f"EventPredicate({self.expression!r})"


def is_truthy(value: Any) -> bool:
    """JMESPath truthiness: unlike Python, 0 is true; false, null and empty strings/lists/objects are not."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True
