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
    # "name (subset)" lines count part of another property's cases, not more of them.
    total = sum(n for name, n in RAN.items() if " (" not in name)
    terminalreporter.write_line(f"{'total (Hypothesis examples)':<44} {total:>8}")
