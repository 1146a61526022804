"""Versioned JSON Schemas (written in YAML, jupyter_events style) of the SOC's events.

``<type>/v<version>.yaml`` describes an event of that type as the API returns it (``GET
/twarga/api/soc/events``), including the ``details`` of each kind of event (its
``action``). A change to an event's fields is a new version next to the old one.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parent
EVENT_TYPES = ("vm", "auth", "system", "security")


def schema_path(event_type: str, version: int = 1) -> Path:
    """Where the schema of ``event_type`` at ``version`` lives."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return SCHEMA_DIR / event_type / f"v{version}.yaml"


@cache
def load_schema(event_type: str, version: int = 1) -> dict[str, Any]:
    """The schema as a dictionary (PyYAML comes with jupyter_events)."""
    import yaml

    return yaml.safe_load(schema_path(event_type, version).read_text())
