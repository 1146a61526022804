"""Threshold watches: one warning when a value stays above its limit, one recovery."""

from __future__ import annotations

import math
from dataclasses import dataclass

from twarga_lab.services.metric_store import (
    SeriesKey,
)
from twarga_lab.services.metrics.catalogue import Thresholds

# -- thresholds --------------------------------------------------------------------------


@dataclass
class _Watch:
    alarm: bool = False
    since: float | None = None  # start of the current streak on the other side


class ThresholdWatch:
    """Per series: ``crossed`` once a value stays above its limit for ``hold_seconds``,
    ``recovered`` once it stays at or below it as long. Nothing in between."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._watches: dict[SeriesKey, _Watch] = {}

    def observe(self, key: SeriesKey, value: float, now: float) -> str | None:
        """``"crossed"``, ``"recovered"`` or None for one new value of ``key``."""
        limit = self.thresholds.limit(key[2])
        if limit is None or math.isnan(value):
            return None
        watch = self._watches.setdefault(key, _Watch())
        # The streak that counts is the one on the other side of the current alarm state.
        moving = (value > limit) != watch.alarm
        if not moving:
            watch.since = None
            return None
        if watch.since is None:
            watch.since = now
        if now - watch.since < self.thresholds.hold_seconds:
            return None
        watch.alarm = not watch.alarm
        watch.since = None
        return "crossed" if watch.alarm else "recovered"

    def forget(self, entity: str, entity_id: int) -> None:
        for key in [k for k in self._watches if k[0] == entity and k[1] == entity_id]:
            del self._watches[key]
