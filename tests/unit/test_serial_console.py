"""The serial-console protocol shared by ``vm.run`` and the console widget."""

from __future__ import annotations

import pytest

from twarga_lab.serial_console import ATTACHED_RE, framed_command, framed_output, strip_ansi


def test_the_typed_line_never_contains_the_markers_whole():
    line, start, end = framed_command("uname -a", "c0ffee00")
    assert start not in line and end not in line
    assert line.endswith("\r") and "uname -a" in line


def test_output_between_the_markers_is_the_commands_own():
    line, start, end = framed_command("echo $((6*7))", "00aa11bb")
    # What a console shows: the echoed line, the markers printed by printf, a prompt.
    screen = f"# {line}\r\n\x1b[0m{start}\r\n42\r\n{end}\r\n# "
    assert framed_output(screen, start, end) == "42"


def test_multi_line_commands_are_refused():
    with pytest.raises(ValueError, match="one line"):
        framed_command("echo a\necho b", "1234abcd")


def test_escape_sequences_are_stripped_and_the_banner_is_known():
    assert strip_ansi("\x1b[1;32mok\x1b[0m\r\n") == "ok\n"
    assert ATTACHED_RE.search("Connected to domain 'x'\r\nEscape character is ^] (Ctrl + ])")
