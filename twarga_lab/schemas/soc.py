"""``GET /twarga/api/soc/events`` (and its ``.csv`` / ``.jsonl`` exports): filters and
paging of the security-event log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import NoneType
from typing import ClassVar, Self

from twarga_lab.errors import InvalidRequest, ValidationFailed
from twarga_lab.schemas.base import MAX_INT, Request, wire
from twarga_lab.services.events import EventType, Severity

LIST_LIMIT, LIST_MAX = 100, 1000  # a listing is one page
# An export streams page by page, so it may be long; ``limit=all`` asks for the most.
EXPORT_LIMIT, EXPORT_MAX = 10_000, 10_000_000


@dataclass(frozen=True)
class EventQuery(Request):
    """Filters and paging of an event listing or export."""

    location: ClassVar[str] = "query"

    limit: int = field(
        default=LIST_LIMIT,
        metadata=wire(
            f"Most events to return (listing: {LIST_LIMIT} by default, at most {LIST_MAX}; "
            f"export: {EXPORT_LIMIT} by default, at most {EXPORT_MAX}); 'all': the most.",
            int,
        ),
    )
    severity: str | None = field(
        default=None, metadata=wire(f"Only this severity: {', '.join(Severity)}.", (str, NoneType))
    )
    type: str | None = field(
        default=None,
        metadata=wire(f"Only this event type: {', '.join(EventType)}.", (str, NoneType)),
    )
    vm_id: int | None = field(
        default=None, metadata=wire("Only events about this VM.", (int, NoneType))
    )
    since_id: int | None = field(
        default=None,
        metadata=wire("Live tail: events with a larger id, oldest first.", (int, NoneType)),
    )
    before_id: int | None = field(
        default=None,
        metadata=wire("Older pages: events with a smaller id, newest first.", (int, NoneType)),
    )

    @classmethod
    def from_query(
        cls,
        args: Mapping[str, str | None],
        *,
        default_limit: int = LIST_LIMIT,
        max_limit: int = LIST_MAX,
    ) -> Self:
        """Parse query-string values (``limit=all``: ``max_limit``); 400 for a non-number,
        422 for a value out of range or unknown."""

        def number(name: str) -> int | None:
            raw = args.get(name)
            if raw is None or raw == "":
                return None
            try:
                value = int(raw)
            except ValueError:
                raise InvalidRequest(f"{name!r} must be an integer", "bad_type") from None
            if abs(value) > MAX_INT:
                raise ValidationFailed(
                    f"{name} must be at most {MAX_INT}", field=name, reason="out_of_range"
                )
            return value

        limit = max_limit if args.get("limit") == "all" else number("limit")
        limit = default_limit if limit is None else limit
        if not 1 <= limit <= max_limit:
            raise ValidationFailed(
                f"limit must be between 1 and {max_limit}", field="limit", reason="out_of_range"
            )
        severity = args.get("severity") or None
        if severity is not None and severity not in Severity.__members__:
            raise ValidationFailed(
                f"severity must be one of {', '.join(Severity)}", field="severity",
                reason="unknown_severity",
            )  # fmt: skip
        type_ = args.get("type") or None
        if type_ is not None and type_ not in EventType.__members__:
            raise ValidationFailed(
                f"type must be one of {', '.join(EventType)}", field="type",
                reason="unknown_type",
            )  # fmt: skip
        since_id, before_id = number("since_id"), number("before_id")
        if since_id is not None and before_id is not None:
            raise ValidationFailed(
                "since_id and before_id cannot be combined", field="since_id", reason="conflict"
            )
        return cls(limit, severity, type_, number("vm_id"), since_id, before_id)

    @classmethod
    def from_export_query(cls, args: Mapping[str, str | None]) -> Self:
        """The same filters for an export: 10,000 events by default, ``all`` up to 10
        million."""
        return cls.from_query(args, default_limit=EXPORT_LIMIT, max_limit=EXPORT_MAX)
