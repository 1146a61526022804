"""What every dashboard shares: a banner for a service that is down, a synchronous
``refresh()``, and live refresh from an asyncio task that keeps the kernel responsive.

A panel splits its refresh in two: ``load()`` makes the blocking client calls and returns
plain data (it runs in a worker thread when live), ``show(data)`` puts the data into the
widgets (it runs on the kernel's event loop). Button actions follow the same split through
:func:`dispatch`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import ipywidgets as widgets
from traitlets import Bool, Float, Instance, Unicode, observe

from twarga_lab.client import Lab, TwargaAPIError
from twarga_lab.widgets.data import service_message

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tasks started by dispatch(): kept referenced until they finish (asyncio holds weak refs).
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def dispatch(
    work: Callable[[], T],
    done: Callable[[T], None],
    fail: Callable[[TwargaAPIError], None],
) -> asyncio.Task[None] | None:
    """Run the blocking ``work()``, then ``done(result)``, or ``fail(error)`` for an error
    answer of the service.

    In a kernel (an event loop runs in this thread, as when a button is clicked) the work
    goes to a worker thread and this returns the task at once; elsewhere (tests, scripts,
    a worker thread) it all happens before this returns, and the result is None.
    """
    loop = _running_loop()
    if loop is None:
        try:
            result = work()
        except TwargaAPIError as error:
            fail(error)
            return None
        done(result)
        return None

    async def run() -> None:
        try:
            result = await asyncio.to_thread(work)
        except TwargaAPIError as error:
            fail(error)
            return
        done(result)

    task = loop.create_task(run())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


class LivePanel(widgets.VBox):
    """A dashboard panel on one :class:`~twarga_lab.client.Lab`.

    ``refresh()`` reads the service now; ``start()`` refreshes every ``interval`` seconds
    from an asyncio task until ``stop()``. When the service cannot be reached the
    ``message`` widget says so, and the next refresh that succeeds clears it.
    """

    lab = Instance(Lab, help="The client this panel reads and acts through.")
    interval = Float(10.0, help="Seconds between live refreshes.")
    error = Unicode("", help="Why the last refresh failed ('' when it succeeded).")
    live = Bool(False, help="Whether the live refresh task runs.")

    title = "Twarga Lab"

    def __init__(self, lab: Lab | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lab = lab if lab is not None else Lab()
        self._live_task: asyncio.Task[None] | None = None
        self.heading = widgets.HTML(f"<h3 style='margin:4px 0'>{self.title}</h3>")
        self.message = widgets.HTML("", layout=widgets.Layout(display="none"))

    # -- to implement ----------------------------------------------------------------------

    def load(self) -> Any:
        """Blocking client calls; returns what ``show`` needs."""
        raise NotImplementedError  # each panel (VMDashboard, SOCFeed ...) defines it

    def show(self, data: Any) -> None:
        """Put freshly loaded data into the widgets (on the kernel's thread)."""
        raise NotImplementedError  # each panel defines it, next to its ``load``

    # -- refresh ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read the service now and update the panel; False if it failed (see ``error``)."""
        try:
            data = self.load()
        except TwargaAPIError as error:
            self._failed(error)
            return False
        self._loaded(data)
        return True

    async def refresh_async(self) -> bool:
        """:meth:`refresh` with the client calls in a worker thread."""
        try:
            data = await asyncio.to_thread(self.load)
        except TwargaAPIError as error:
            self._failed(error)
            return False
        self._loaded(data)
        return True

    def request_refresh(self) -> None:
        """Refresh soon: at once outside a kernel, in the background inside one."""
        loop = _running_loop()
        if loop is None:
            self.refresh()
            return
        task = loop.create_task(self.refresh_async())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def _loaded(self, data: Any) -> None:
        self.show(data)
        self.error = ""

    def _failed(self, error: BaseException) -> None:
        self.error = service_message(error, self.interval if self.live else None)

    @observe("error")
    def _show_error(self, change: dict[str, Any]) -> None:
        with self.message.hold_sync():
            self.message.value = (
                f"<div style='background:#fdecea;color:#611a15;padding:6px 10px;"
                f"border-radius:4px'>{change['new']}</div>"
                if change["new"]
                else ""
            )
            self.message.layout.display = "" if change["new"] else "none"

    # -- live ------------------------------------------------------------------------------

    def start(self) -> None:
        """Refresh every ``interval`` seconds in the background (in a kernel)."""
        if self._live_task is not None and not self._live_task.done():
            return
        loop = _running_loop() or asyncio.get_event_loop()
        self._live_task = loop.create_task(self._live_loop())
        self.live = True

    def stop(self) -> None:
        """Stop the live refresh."""
        if self._live_task is not None:
            self._live_task.cancel()
            self._live_task = None
        self.live = False

    async def _live_loop(self) -> None:
        while True:
            try:
                await self.refresh_async()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug must not end the live refresh silently
                log.exception("refresh of %s failed", type(self).__name__)
                self._failed(error)
            await asyncio.sleep(self.interval)
