"""``MonitorDashboard``: live charts of the host's CPU, memory, disk and network, and of one
VM chosen in a dropdown, over a history window of 1 hour to 7 days."""

from __future__ import annotations

from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np
from traitlets import Enum, Int, observe

from twarga_lab.client import Lab
from twarga_lab.widgets.base import LivePanel
from twarga_lab.widgets.data import RANGES, history_series, host_summary, vm_options, vm_summary

# (chart title, y label, percent?, [(metric, legend, colour)])
HOST_CHARTS = (
    ("Host CPU", "%", True, [("cpu_usage", "CPU", "#1f77b4")]),
    ("Host memory", "%", True, [("memory_usage", "memory", "#9467bd")]),
    ("Host disk", "%", True, [("disk_usage", "disk", "#8c564b")]),
    (
        "Host network",
        "B/s",
        False,
        [
            ("net_sent_bytes_per_s", "sent", "#2ca02c"),
            ("net_recv_bytes_per_s", "received", "#d62728"),
        ],
    ),
)
VM_CHARTS = (
    (
        "VM usage",
        "%",
        True,
        [
            ("cpu_usage", "CPU", "#1f77b4"),
            ("memory_usage", "memory", "#9467bd"),
            ("disk_usage", "disk", "#8c564b"),
        ],
    ),
    (
        "VM network",
        "B/s",
        False,
        [
            ("net_sent_bytes_per_s", "sent", "#2ca02c"),
            ("net_recv_bytes_per_s", "received", "#d62728"),
        ],
    ),
)
EMPTY_X = np.array([], dtype="datetime64[ms]")


class TimeChart(widgets.VBox):
    """A bqplot figure of a few time series sharing a date axis."""

    def __init__(self, title: str, unit: str, percent: bool, series: list[tuple[str, str, str]]):
        super().__init__()
        x_scale = bq.DateScale()
        y_scale = bq.LinearScale(min=0.0, max=100.0) if percent else bq.LinearScale(min=0.0)
        self.lines: dict[str, bq.Lines] = {
            metric: bq.Lines(
                x=EMPTY_X,
                y=np.array([], dtype=float),
                scales={"x": x_scale, "y": y_scale},
                colors=[color],
                labels=[legend],
                display_legend=len(series) > 1,
                stroke_width=1.5,
            )
            for metric, legend, color in series
        }
        self.figure = bq.Figure(
            title=title,
            marks=list(self.lines.values()),
            axes=[
                bq.Axis(scale=x_scale, label="time (UTC)", grid_lines="none"),
                bq.Axis(scale=y_scale, orientation="vertical", label=unit, tick_format=".3s"),
            ],
            legend_location="top-left",
            fig_margin={"top": 40, "bottom": 40, "left": 60, "right": 10},
            layout=widgets.Layout(width="100%", height="240px"),
        )
        self.children = [self.figure]

    def set(self, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """New points for each metric (missing metrics become empty)."""
        for metric, line in self.lines.items():
            x, y = series.get(metric, (EMPTY_X, np.array([], dtype=float)))
            with line.hold_sync():
                line.x, line.y = x, y


class MonitorDashboard(LivePanel):
    """Host and VM metrics as live line charts.

    ``window`` ("1h", "6h", "24h", "7d") picks the history shown (the range buttons set it);
    ``vm_id`` picks the VM (the dropdown sets it; None shows none).
    """

    title = "Monitor"
    window = Enum(list(RANGES), "1h", help="The history window shown.")
    vm_id = Int(None, allow_none=True, help="The VM whose charts are shown.")

    def __init__(self, lab: Lab | None = None, **kwargs: Any) -> None:
        super().__init__(lab, **kwargs)
        self.range_picker = widgets.ToggleButtons(options=list(RANGES), value=self.window)
        self.vm_picker = widgets.Dropdown(description="VM", options=[("—", None)], value=None)
        widgets.link((self.range_picker, "value"), (self, "window"))
        widgets.link((self.vm_picker, "value"), (self, "vm_id"))
        self.host_now = widgets.HTML("")
        self.vm_now = widgets.HTML("<i>Choose a VM to see its charts.</i>")
        self.host_charts = [TimeChart(*spec) for spec in HOST_CHARTS]
        self.vm_charts = [TimeChart(*spec) for spec in VM_CHARTS]
        grid = widgets.GridBox(
            self.host_charts,
            layout=widgets.Layout(grid_template_columns="repeat(2, 1fr)", width="100%"),
        )
        vm_grid = widgets.GridBox(
            self.vm_charts,
            layout=widgets.Layout(grid_template_columns="repeat(2, 1fr)", width="100%"),
        )
        self.children = [
            widgets.HBox([self.heading, self.range_picker]),
            self.message,
            self.host_now,
            grid,
            widgets.HBox([self.vm_picker]),
            self.vm_now,
            vm_grid,
        ]

    @observe("window", "vm_id")
    def _query_changed(self, _: Any) -> None:
        self.request_refresh()

    def load(self) -> dict[str, Any]:
        since, step = RANGES[self.window]
        vm_id = self.vm_id
        history = self.lab.metrics.history
        data: dict[str, Any] = {
            "host": self.lab.metrics.host(),
            "vms": [vm.to_dict() for vm in self.lab.vms.list()],
            "host_series": {
                metric: history_series(history(metric, since=since, step=step))
                for _, _, _, series in HOST_CHARTS
                for metric, _, _ in series
            },
            "vm_id": vm_id,
        }
        if vm_id is not None:
            data["vm"] = self.lab.metrics.vm(vm_id)
            data["vm_series"] = {
                metric: history_series(history(metric, vm=vm_id, since=since, step=step))
                for _, _, _, series in VM_CHARTS
                for metric, _, _ in series
            }
        return data

    def show(self, data: dict[str, Any]) -> None:
        self.host_now.value = host_summary(data["host"])
        for chart in self.host_charts:
            chart.set(data["host_series"])
        options = [("—", None), *vm_options(data["vms"])]
        if list(self.vm_picker.options) != options:
            ids = [vm_id for _, vm_id in options]
            with self.vm_picker.hold_sync():
                current = self.vm_picker.value
                self.vm_picker.options = options
                self.vm_picker.value = current if current in ids else None
        if data["vm_id"] is None or data["vm_id"] != self.vm_id:
            if self.vm_id is None:
                self.vm_now.value = "<i>Choose a VM to see its charts.</i>"
                for chart in self.vm_charts:
                    chart.set({})
            return
        self.vm_now.value = vm_summary(data["vm"])
        for chart in self.vm_charts:
            chart.set(data["vm_series"])
