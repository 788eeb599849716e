"""Text from data (payloads, partner values, error details) made safe to print on an operator's terminal.

Data may hold rich markup (``[/bold]``, ``[red]``) that would break or restyle the output, or control
characters (ESC ``[2J`` clears the screen, a bidi override reorders the line) that take over the
terminal. Every command prints data through ``printable`` (plain output) or ``data_text`` (rich console
and tables: a ``Text``, which rich never parses for markup or emoji codes); control characters are shown
as escapes (``\\x1b``) so the operator sees they are there. ``--json`` output needs neither: JSON escapes
them itself.
"""

from __future__ import annotations

import re

from rich.text import Text

# C0 and C1 controls and DEL, line/paragraph separators, and the bidi embedding/override/isolate marks.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _shown(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(value: object, *, multiline: bool = False) -> str:
    """``value`` as text with every control character shown as an escape; ``multiline`` keeps newlines."""
    if not multiline:
        return _UNSAFE.sub(_shown, str(value))
    return "\n".join(_UNSAFE.sub(_shown, line) for line in str(value).split("\n"))


def data_text(value: object, *, multiline: bool = False, style: str = "") -> Text:
    """``printable`` as a rich ``Text``: shown exactly as written, for ``Console.print`` and table cells."""
    return Text(printable(value, multiline=multiline), style=style)
