"""Twarga Lab: a self-hosted lab cloud inside Jupyter."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from twarga_lab.app import TwargaLabApp

    return [{"module": "twarga_lab", "app": TwargaLabApp}]
