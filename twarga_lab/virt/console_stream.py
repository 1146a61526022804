"""A domain's serial console over a libvirt stream, as virt-manager and nova attach to it.

``virDomain.openConsole(None, stream, VIR_DOMAIN_CONSOLE_FORCE)`` on a non-blocking
``virStream``: no ``virsh`` subprocess, no pty and nothing printed by a client program in
between, and ``FORCE`` takes the console over from any other session. The stream's
callbacks run in libvirt's event loop thread (``libvirt_backend.ensure_event_loop``);
``on_output`` and ``on_closed`` are called from that thread, so callers hand the data on
to their own loop. Writing only queues bytes and asks for a "writable" callback; the
sending happens in the event thread too, so the caller's thread never waits on libvirt.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import libvirt

log = logging.getLogger(__name__)

_READ_EVENTS = (
    libvirt.VIR_STREAM_EVENT_READABLE
    | libvirt.VIR_STREAM_EVENT_ERROR
    | libvirt.VIR_STREAM_EVENT_HANGUP
)
_CHUNK = 64 * 1024

OutputCallback = Callable[[bytes], None]
ClosedCallback = Callable[[str], None]


class ConsoleStream:
    """One attached console: ``write()`` keystrokes, output arrives through ``on_output``.

    ``on_closed(reason)`` is called once when the console ends by itself (the domain
    stopped, libvirt hung up, another session took it over), never after ``close()``.
    """

    def __init__(
        self,
        stream: libvirt.virStream,
        on_output: OutputCallback,
        on_closed: ClosedCallback,
    ) -> None:
        self._stream = stream
        self._on_output = on_output
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._pending = b""
        self._reading = True
        self._closed = False

    @classmethod
    def open(
        cls,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        on_output: OutputCallback,
        on_closed: ClosedCallback,
    ) -> ConsoleStream:
        """Attach to the domain's first console, taking it over from any other session.

        Raises ``libvirt.libvirtError`` (the domain is not running, the driver has no
        consoles); blocks for one round trip to libvirtd.
        """
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            console = cls(stream, on_output, on_closed)
            stream.eventAddCallback(_READ_EVENTS, console._on_event, None)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return console

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the guest; it is sent from libvirt's event thread."""
        if not data:
            return
        with self._lock:
            if self._closed:
                return
            self._pending += data
            self._update_events()

    def set_reading(self, reading: bool) -> None:
        """Pause (False) or resume reading the guest's output: while the reader cannot
        keep up, the guest's serial line waits instead of the output piling up here."""
        with self._lock:
            if self._closed or self._reading == reading:
                return
            self._reading = reading
            self._update_events()

    def _update_events(self) -> None:
        # Called with the lock held, so a send that just emptied the queue cannot undo a
        # write that filled it (libvirt runs no stream callback while we wait here).
        events = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        if self._reading:
            events |= libvirt.VIR_STREAM_EVENT_READABLE
        if self._pending:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventUpdateCallback(events)

    def close(self) -> None:
        """Detach (idempotent); ``on_closed`` is not called."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending = b""
        self._release()

    # -- libvirt's event thread ---------------------------------------------------------

    def _release(self) -> None:
        # Both fail harmlessly on a stream libvirt already tore down (domain gone).
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()

    def _end(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending = b""
        self._release()
        try:
            self._on_closed(reason)
        except Exception:
            log.exception("console close callback failed")

    def _on_event(self, _stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if self._closed:
            return
        if events & libvirt.VIR_STREAM_EVENT_READABLE and not self._read():
            return
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._end("the console hung up")
            return
        if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
            self._send()

    def _read(self) -> bool:
        """Pass on what the guest printed; False once the console ended."""
        while self._reading:
            try:
                data = self._stream.recv(_CHUNK)
            except libvirt.libvirtError as e:
                self._end(f"the console failed: {e.get_error_message() or e}")
                return False
            if data == -2:  # EAGAIN: nothing more for now
                return True
            if not data:  # EOF: the domain stopped
                self._end("the VM stopped")
                return False
            try:
                self._on_output(bytes(data))
            except Exception:
                log.exception("console output callback failed")
        return True

    def _send(self) -> None:
        with self._lock:
            pending = self._pending
        sent = 0
        if pending:
            try:
                sent = self._stream.send(pending)
            except libvirt.libvirtError as e:
                self._end(f"the console failed: {e.get_error_message() or e}")
                return
            if sent < 0:  # -2, EAGAIN: the next writable event retries
                return
        with self._lock:
            self._pending = self._pending[sent:]
            if not self._pending and not self._closed:
                self._update_events()
