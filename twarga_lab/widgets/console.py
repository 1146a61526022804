"""``ConsoleWidget``: an interactive terminal on a VM's serial console, in a notebook.

It speaks terminado's protocol over the VM's console websocket (``VM._connect``: the
token travels in a header, never in the URL): ``["stdin", text]`` and ``["set_size",
rows, cols]`` out, ``["stdout", text]`` and ``["disconnect", 1]`` in. A daemon thread
reads the socket, so the kernel stays free while the VM talks.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Float, Int, Unicode

from twarga_lab.serial_console import ANSI_RE, ATTACHED_RE

DISCONNECTED = "[disconnected]"
# Other control characters a serial console sends that a <pre> cannot show.
_CONTROL_RE = re.compile(r"[\x00-\x07\x0b-\x1f\x7f]")


def console_text(screen: str, chunk: str, max_chars: int) -> str:
    """``screen`` after the console printed ``chunk``: escape sequences removed, ``\\r\\n``
    as a newline, backspaces applied, at most the last ``max_chars`` characters."""
    text = ANSI_RE.sub("", chunk).replace("\r\n", "\n")
    out = list(screen)
    for char in text:
        if char == "\b":
            if out and out[-1] != "\n":
                out.pop()
        elif char == "\r" or _CONTROL_RE.match(char):
            continue
        else:
            out.append(char)
    result = "".join(out)
    return result[-max_chars:] if len(result) > max_chars else result


def render_screen(text: str) -> str:
    """The screen as HTML."""
    return (
        "<pre style='background:#1e1e1e;color:#e0e0e0;padding:6px;margin:0;"
        "height:320px;overflow-y:auto;white-space:pre-wrap;font-size:12px'>"
        f"{html.escape(text)}</pre>"
    )


class ConsoleWidget(widgets.VBox):
    """The serial console of one VM: what ``vm.console()`` returns.

    Type a line and press Enter to send it (with a carriage return); "Ctrl-C" interrupts;
    "Reconnect" opens a new session (one per VM: it takes over from any other).
    ``send_line()``, ``interrupt()``, ``wait_for()`` and ``disconnect()`` do it from code.
    """

    rows = Int(24, help="Terminal rows told to the console.")
    cols = Int(100, help="Terminal columns told to the console.")
    max_chars = Int(20000, help="How much output the screen keeps.")
    text = Unicode("", help="The output so far, as plain text.")
    connected = Bool(False, help="Whether the websocket is open.")
    attach_timeout = Float(5.0, help="Seconds to hold typed input back while the console attaches.")

    def __init__(
        self,
        vm: Any,
        connect: Callable[[float], Any] | None = None,
        autoconnect: bool = True,
        timeout: float = 15.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.vm = vm
        self._open = connect or vm._connect
        self.timeout = timeout
        self._ws: Any = None
        self._reader: threading.Thread | None = None
        # Input typed before the console is attached waits here (see ATTACHED_RE).
        self._attached = False
        self._pending: list[str] = []
        self._banner = ""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.header = widgets.HTML(f"<b>Console of {html.escape(str(vm.name))}</b>")
        self.status = widgets.HTML("")
        self.screen = widgets.HTML(render_screen(""))
        self.input = widgets.Text(
            placeholder="type a command, Enter sends it",
            layout=widgets.Layout(width="60%"),
        )
        # The Text widget sends a "submit" message on Enter (on_submit is deprecated).
        self.input.on_msg(self._on_input_msg)
        self.enter_button = widgets.Button(description="Enter", tooltip="send the line")
        self.enter_button.on_click(lambda _: self._submit())
        self.ctrl_c_button = widgets.Button(description="Ctrl-C", button_style="warning")
        self.ctrl_c_button.on_click(lambda _: self.interrupt())
        self.reconnect_button = widgets.Button(description="Reconnect", icon="plug")
        self.reconnect_button.on_click(lambda _: self.connect())
        self.close_button = widgets.Button(description="Disconnect", icon="times")
        self.close_button.on_click(lambda _: self.disconnect())
        self.children = [
            widgets.HBox([self.header, self.status]),
            self.screen,
            widgets.HBox(
                [
                    self.input,
                    self.enter_button,
                    self.ctrl_c_button,
                    self.reconnect_button,
                    self.close_button,
                ]
            ),
        ]
        self.observe(self._text_changed, "text")
        self.observe(self._connected_changed, "connected")
        self._connected_changed(None)
        if autoconnect:
            self.connect()

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> bool:
        """Open (or reopen) the console; False with the reason in ``status`` if it fails."""
        self.disconnect()
        self.status.value = "<i>connecting…</i>"
        try:
            ws = self._open(self.timeout)
        except Exception as error:  # websocket handshake refused, service down...
            self.status.value = (
                f"<span style='color:#b71c1c'>⚠ cannot open the console: "
                f"{html.escape(_reason(error))}</span>"
            )
            return False
        ws.settimeout(None)  # the reader blocks until the VM says something
        with self._lock:
            self._ws = ws
            self._attached, self._pending, self._banner = False, [], ""
        self.connected = True
        self._send_message(["set_size", self.rows, self.cols])
        timer = threading.Timer(self.attach_timeout, self._attach, args=(ws,))
        timer.daemon = True
        timer.start()
        self._reader = threading.Thread(
            target=self._read, args=(ws,), name=f"console-{self.vm.name}", daemon=True
        )
        self._reader.start()
        return True

    def disconnect(self) -> None:
        """End the session (the VM keeps running)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            # A close frame for the service, then wake the reader blocked in recv().
            for step in (ws.send_close, ws.abort, ws.shutdown):
                with contextlib.suppress(Exception):  # already gone
                    step()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2)

    def _read(self, ws: Any) -> None:
        try:
            while True:
                message = ws.recv()
                if not message:
                    break
                kind, *payload = json.loads(message)
                if kind == "stdout":
                    self._append(payload[0])
                elif kind == "disconnect":
                    break
        except Exception:  # closed by us or by the service: either way the session ended
            pass  # the finally clause below shows "[disconnected]"
        finally:
            ours = self._ws is ws
            if ours:  # the service ended the session: let go of the socket too
                self._ws = None
                with contextlib.suppress(Exception):
                    ws.shutdown()
            if ours or self._ws is None:
                with self._changed:
                    self._append(f"\n{DISCONNECTED}\n")
                    self.connected = False
                    self._changed.notify_all()

    def _append(self, chunk: str) -> None:
        with self._changed:
            self.text = console_text(self.text, chunk, self.max_chars)
            self._changed.notify_all()
            if not self._attached:
                self._banner = (self._banner + chunk)[-1000:]
                if ATTACHED_RE.search(ANSI_RE.sub("", self._banner)):
                    self._attach(self._ws)

    def _attach(self, ws: Any) -> None:
        """The console is attached (or the wait is over): send what was typed so far,
        after an Enter that brings up the shell's prompt."""
        with self._lock:
            if self._attached or ws is None or self._ws is not ws:
                return
            self._attached = True
            pending, self._pending = self._pending, []
            for text in ["\r", *pending]:
                with contextlib.suppress(Exception):  # the session just ended
                    ws.send(json.dumps(["stdin", text]))

    # -- input -----------------------------------------------------------------------------

    def _send_message(self, message: list[Any]) -> None:
        if self._ws is None:
            raise ConnectionError("the console is not connected: click Reconnect")
        self._ws.send(json.dumps(message))

    def write(self, text: str) -> None:
        """Type ``text`` as it is (held back until the console is attached)."""
        with self._lock:
            if self._ws is not None and not self._attached:
                self._pending.append(text)
                return
        self._send_message(["stdin", text])

    def send_line(self, line: str) -> None:
        """Type ``line`` and press Enter."""
        self.write(line + "\r")

    def interrupt(self) -> None:
        """Press Ctrl-C."""
        self.write("\x03")

    def _on_input_msg(self, _: Any, content: dict[str, Any], buffers: Any) -> None:
        if content.get("event") == "submit":
            self._submit()

    def _submit(self) -> None:
        line, self.input.value = self.input.value, ""
        try:
            self.send_line(line)
        except (ConnectionError, OSError) as error:
            self.status.value = f"<span style='color:#b71c1c'>⚠ {html.escape(str(error))}</span>"

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """Block until the output matches the regular expression ``pattern``; returns the
        output. TimeoutError at the deadline, ConnectionError if the console closes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not re.search(pattern, self.text):
                if not self.connected:
                    raise ConnectionError(f"the console closed: {self.text[-300:]!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {pattern!r} on the console: {self.text[-300:]!r}")
                self._changed.wait(min(remaining, 0.5))
            return self.text

    # -- display ---------------------------------------------------------------------------

    def _text_changed(self, change: dict[str, Any]) -> None:
        self.screen.value = render_screen(change["new"])

    def _connected_changed(self, _: Any) -> None:
        self.status.value = (
            " <span style='color:#2e7d32'>● connected</span>"
            if self.connected
            else f" <span style='color:#757575'>○ {DISCONNECTED}</span>"
        )
        for button in (self.enter_button, self.ctrl_c_button):
            button.disabled = not self.connected
        self.input.disabled = not self.connected


def _reason(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    body = getattr(error, "resp_body", None)
    if body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return f"{message} ({status})"
    return f"{error} ({status})" if status else str(error)
