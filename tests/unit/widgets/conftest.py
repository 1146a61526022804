"""Fixtures of the widget tests: the notebook client against the in-process server."""

from __future__ import annotations

from typing import Any

import pytest

from twarga_lab.client import Lab


@pytest.fixture
def lab_as(twarga: Any, jp_fetch: Any, jp_http_port: int, jp_base_url: str) -> Any:
    """``lab_as("alice")``: the notebook client against the in-process server (``jp_fetch``
    makes pytest-jupyter listen on its port)."""
    labs: list[Lab] = []

    def make(user: str) -> Lab:
        lab = Lab(f"http://127.0.0.1:{jp_http_port}{jp_base_url}", f"{user}-token", timeout=20)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab._http.close()
