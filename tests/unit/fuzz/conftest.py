"""Prints how many hostile cases each property ran (the figure issue 14 asks for)."""

from __future__ import annotations

from typing import Any

from tests.unit.fuzz import RAN


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RAN:
        return
    terminalreporter.write_sep("-", "hostile-input cases (Hypothesis)")
    for name, count in sorted(RAN.items()):
        terminalreporter.write_line(f"{name:<44} {count:>8}")
    terminalreporter.write_line(f"{'total':<44} {sum(RAN.values()):>8}")
