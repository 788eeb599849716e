"""Text from data made safe for the terminal: control characters shown as escapes, markup shown as is."""

from __future__ import annotations

from rich.console import Console

from router.terminal import data_text, printable


def test_control_characters_are_shown_as_escapes_and_newlines_kept_only_when_asked() -> None:
    text = "a\x1b[2J\tb\x7f\x9b\u202ec\u2028d\ne"

    assert printable(text) == "a\\x1b[2J\\tb\\x7f\\x9b\\u202ec\\u2028d\\ne"
    assert printable(text, multiline=True) == "a\\x1b[2J\\tb\\x7f\\x9b\\u202ec\\u2028d\ne"
    assert printable("Grüße, 東京 ✓") == "Grüße, 東京 ✓"
    assert printable(42) == "42"


def test_markup_in_data_prints_as_written() -> None:
    console = Console(record=True, width=200)

    for value in ("[/bold] closes nothing", "[red]red[/red]", "ends in a backslash\\", ":thumbs_up:"):
        console.print(data_text(value))

    assert console.export_text().splitlines() == [
        "[/bold] closes nothing",
        "[red]red[/red]",
        "ends in a backslash\\",
        ":thumbs_up:",
    ]
