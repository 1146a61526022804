"""``GET /twarga/api/metrics/history``: which metric of the host or a VM, over which window,
at which step. The seed's (Twarga Cloud's) names still work: ``metric_type`` for
``metric``, ``vm_id`` for ``id`` (and ``entity=vm``), ``hours`` for a window ending now and
a bare negative ``since`` for seconds before now."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import NoneType
from typing import ClassVar, Self

from twarga_lab.errors import InvalidRequest, ValidationFailed
from twarga_lab.schemas.base import MAX_INT, Request, wire
from twarga_lab.services.metrics.catalogue import METRICS, SEED_METRICS

# One request may ask for at most this many points (window / step): a 90-day window with
# a 1-second step would otherwise be a request to shape millions of buckets.
MAX_POINTS = 20_000
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIME_DOC = "ISO 8601 (naive means UTC), Unix seconds, 'now', or relative like '-30m', '-6h'"


def parse_time(value: str, name: str, now: float) -> float:
    """ISO 8601 (naive means UTC), Unix seconds, ``now`` or ``-30m`` / ``-6h`` / ``-7d``."""
    text = value.strip()
    if text == "now":
        return now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    with contextlib.suppress(ValueError):
        number = float(text)
        if math.isfinite(number):
            # A bare negative number is seconds before now (``since=-300``), not 1969.
            return now + number if number < 0 else number
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{name!r} must be an ISO 8601 time, Unix seconds, 'now' or like '-6h'",
            "bad_type",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class HistoryQuery(Request):
    """A checked ``GET /metrics/history`` request; times are Unix seconds."""

    location: ClassVar[str] = "query"
    required: ClassVar[tuple[str, ...]] = ("entity", "metric")

    entity: str = field(metadata=wire("'host' or 'vm' (implied by the seed's 'vm_id').", str))
    entity_id: int | None = field(
        metadata=wire(
            "The VM's id (entity=vm only).", (int, NoneType), name="id", aliases=("vm_id",)
        )
    )
    metric: str = field(
        metadata=wire(
            "A metric of the entity, or a seed name (cpu, memory, disk, network).",
            str,
            aliases=("metric_type",),
        )
    )
    since: float = field(
        metadata=wire(
            f"Start of the window: {TIME_DOC}. The seed's 'hours' (a number) means a window "
            "of that many hours ending at 'until'.",
            str,
            aliases=("hours",),
            default="-1h",
        )
    )
    until: float = field(metadata=wire(f"End of the window: {TIME_DOC}.", str, default="now"))
    step: float | None = field(
        default=None,
        metadata=wire(
            "Seconds between points (averaged); default: about 1000 points.", (float, NoneType)
        ),
    )
    # The stored series the metric reads: itself, or both directions for ``network``.
    series: tuple[str, ...] = field(default=(), metadata=wire("", tuple, internal=True))

    def series_names(self) -> tuple[str, ...]:
        """The stored metrics this query reads."""
        return self.series or (self.metric,)

    @classmethod
    def from_query(cls, args: Mapping[str, str | None], *, now: float, max_window: float) -> Self:
        """Check the query arguments: 400 for a missing or malformed one, 422 for a value
        out of bounds (with its ``field``)."""
        entity = args.get("entity") or ("vm" if args.get("vm_id") else None)
        if not entity:
            raise InvalidRequest("'entity' is required (host or vm)", "missing_field")
        if entity not in METRICS:
            raise ValidationFailed(
                "entity must be 'host' or 'vm'", field="entity", reason="bad_entity"
            )
        entity_id: int | None = None
        if entity == "vm":
            raw_id = args.get("id") or args.get("vm_id")
            if not raw_id:
                raise InvalidRequest("'id' is required for entity=vm", "missing_field")
            if not raw_id.isdigit():
                raise InvalidRequest("'id' must be an integer", "bad_type")
            entity_id = int(raw_id)
            if entity_id > MAX_INT:
                raise ValidationFailed(f"id must be at most {MAX_INT}", "id", "out_of_range")
        metric = args.get("metric") or args.get("metric_type")
        if not metric:
            raise InvalidRequest("'metric' is required", "missing_field")
        series = SEED_METRICS.get(metric, ())
        if metric not in METRICS[entity] and not series:
            names = [*METRICS[entity], *SEED_METRICS]
            raise ValidationFailed(
                f"metric must be one of {', '.join(names)} for entity={entity}",
                field="metric",
                reason="unknown_metric",
            )
        until = parse_time(args.get("until") or "now", "until", now)
        since = parse_time(args.get("since") or "-1h", "since", now)
        hours = args.get("hours")
        if hours:
            if args.get("since"):
                raise ValidationFailed(
                    "send either 'hours' or 'since', not both",
                    field="hours",
                    reason="conflicting_fields",
                )
            try:
                span = float(hours) * 3600
            except ValueError:
                raise InvalidRequest("'hours' must be a number", "bad_type") from None
            if not math.isfinite(span) or span <= 0:
                raise ValidationFailed("hours must be positive", field="hours", reason="bad_window")
            since = until - span
        if since >= until:
            raise ValidationFailed("since must be before until", field="since", reason="bad_window")
        if until - since > max_window:
            raise ValidationFailed(
                f"the window may be at most {max_window / 86400:g} days",
                field="since",
                reason="window_too_long",
            )
        step = cls._step(args.get("step"), until - since)
        # Seed names map to ours; ``network`` keeps its name and reads both directions.
        if series and len(series) == 1:
            metric, series = series[0], ()
        return cls(entity, entity_id, metric, since, until, step, series)

    @staticmethod
    def _step(raw_step: str | None, window: float) -> float | None:
        """The step in seconds, or None; 422 for one under a second, over the window or
        giving more than ``MAX_POINTS`` points."""
        if not raw_step:
            return None
        try:
            step = float(raw_step)
        except ValueError:
            raise InvalidRequest("'step' must be a number of seconds", "bad_type") from None
        if not math.isfinite(step) or step < 1 or step > window:
            raise ValidationFailed(
                "step must be at least 1 second and at most the window",
                field="step",
                reason="bad_step",
            )
        if window / step > MAX_POINTS:
            raise ValidationFailed(
                f"window / step may give at most {MAX_POINTS} points; use a larger step",
                field="step",
                reason="too_many_points",
            )
        return step
