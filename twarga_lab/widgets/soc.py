"""``SOCFeed``: the security-event log as a live table with severity and type filters, and
(for admins) statistics charts and the last 24 hours' timeline."""

from __future__ import annotations

from typing import Any

import bqplot as bq
import ipywidgets as widgets
from traitlets import Int, Unicode, observe

from twarga_lab.client import Lab, PermissionDenied
from twarga_lab.widgets.base import LivePanel
from twarga_lab.widgets.data import (
    EVENT_COLUMNS,
    EVENT_TYPES,
    SEVERITIES,
    SEVERITY_COLORS,
    count_bars,
    event_records,
    event_rows,
    html_table,
    merge_events,
    timeline,
)

TYPE_COLORS = ["#1f77b4", "#2ca02c", "#7f7f7f", "#d62728"]
ADMINS_ONLY = "<i>Statistics and the 24-hour timeline are for admins.</i>"


def _bar_chart(title: str, colors: list[str], **bars: Any) -> tuple[bq.Figure, bq.Bars]:
    x, y = bq.OrdinalScale(), bq.LinearScale(min=0.0)
    mark = bq.Bars(x=[], y=[], scales={"x": x, "y": y}, colors=colors, **bars)
    figure = bq.Figure(
        title=title,
        marks=[mark],
        axes=[
            bq.Axis(scale=x, grid_lines="none"),
            bq.Axis(scale=y, orientation="vertical", tick_format="d"),
        ],
        fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 10},
        layout=widgets.Layout(width="100%", height="240px"),
    )
    return figure, mark


class SOCFeed(LivePanel):
    """The events I may see (admins: all), newest first, tailed live with ``since_id``.

    ``severity`` and ``event_type`` ('' for all) filter the table; the dropdowns set them.
    """

    title = "Security events"
    severity = Unicode("", help="Show only this severity ('' for all).")
    event_type = Unicode("", help="Show only this type ('' for all).")
    max_rows = Int(200, help="How many of the newest events the table keeps.")

    def __init__(self, lab: Lab | None = None, **kwargs: Any) -> None:
        super().__init__(lab, **kwargs)
        self.events: list[dict[str, Any]] = []
        self.admin: bool | None = None
        self.severity_picker = widgets.Dropdown(
            description="Severity", options=[("all", ""), *((s, s) for s in SEVERITIES)], value=""
        )
        self.type_picker = widgets.Dropdown(
            description="Type", options=[("all", ""), *((t, t) for t in EVENT_TYPES)], value=""
        )
        widgets.link((self.severity_picker, "value"), (self, "severity"))
        widgets.link((self.type_picker, "value"), (self, "event_type"))
        self.count = widgets.HTML("")
        self.table = widgets.HTML("", layout=widgets.Layout(max_height="420px", overflow="auto"))
        self.severity_chart, self.severity_bars = _bar_chart(
            "Events by severity", [SEVERITY_COLORS[s] for s in SEVERITIES]
        )
        self.type_chart, self.type_bars = _bar_chart("Events by type", TYPE_COLORS)
        self.timeline_chart, self.timeline_bars = _bar_chart(
            "Last 24 hours (per hour)",
            [SEVERITY_COLORS[s] for s in SEVERITIES],
            type="stacked",
            labels=list(SEVERITIES),
            display_legend=True,
        )
        self.stats_summary = widgets.HTML("")
        self.statistics = widgets.VBox(
            [
                self.stats_summary,
                widgets.GridBox(
                    [self.severity_chart, self.type_chart],
                    layout=widgets.Layout(grid_template_columns="repeat(2, 1fr)", width="100%"),
                ),
                self.timeline_chart,
            ]
        )
        self.note = widgets.HTML("")
        self.children = [
            self.heading,
            self.message,
            widgets.HBox([self.severity_picker, self.type_picker, self.count]),
            self.table,
            self.note,
            self.statistics,
        ]

    @observe("lab")
    def _lab_changed(self, _: Any) -> None:
        self.events, self.admin = [], None

    @observe("severity", "event_type")
    def _filters_changed(self, _: Any) -> None:
        # A new filter starts a new listing: the tail so far was of other events.
        self.events = []
        self.request_refresh()

    def load(self) -> dict[str, Any]:
        filters = {"severity": self.severity or None, "type": self.event_type or None}
        since_id = self.events[0]["id"] if self.events else None
        frame = self.lab.soc.events(limit=self.max_rows, since_id=since_id, **filters)
        data: dict[str, Any] = {
            "filters": filters,
            "tail": since_id is not None,
            "events": event_records(frame),
        }
        admin = self.admin if self.admin is not None else bool(self.lab.me().get("admin"))
        data["admin"] = admin
        if admin:
            try:
                data["statistics"] = self.lab.soc.statistics()
            except PermissionDenied:
                data["admin"] = False
        return data

    def show(self, data: dict[str, Any]) -> None:
        if data["filters"] != {"severity": self.severity or None, "type": self.event_type or None}:
            return  # loaded for filters changed since; their own refresh follows
        existing = self.events if data["tail"] else []
        self.events = merge_events(existing, data["events"], self.max_rows)
        self.table.value = html_table(
            EVENT_COLUMNS, event_rows(self.events), empty="No events match."
        )
        self.count.value = f"{len(self.events)} events shown"
        self.admin = data["admin"]
        self.note.value = "" if self.admin else ADMINS_ONLY
        self.statistics.layout.display = "" if self.admin else "none"
        if self.admin:
            self._show_statistics(data["statistics"])

    def _show_statistics(self, stats: dict[str, Any]) -> None:
        self.stats_summary.value = (
            f"<b>{stats.get('total_events', 0)}</b> events in all · "
            f"<b>{stats.get('active_bans', 0)}</b> active bans"
        )
        for mark, counts, order in (
            (self.severity_bars, stats.get("by_severity", {}), SEVERITIES),
            (self.type_bars, stats.get("by_type", {}), EVENT_TYPES),
        ):
            labels, heights = count_bars(counts, order)
            with mark.hold_sync():
                mark.x, mark.y = labels, heights
        hours, stacks = timeline(stats.get("per_hour", []))
        with self.timeline_bars.hold_sync():
            self.timeline_bars.x, self.timeline_bars.y = hours, stacks
