"""The serial-console protocol shared by the Python client (``vm.run``) and the notebook
console widget: what a VM's console prints and how a typed command's output is framed.

Pure functions and patterns, no I/O: the websocket (terminado's protocol) lives in
:mod:`twarga_lab.client` and :mod:`twarga_lab.widgets.console`.
"""

from __future__ import annotations

import re

# Terminal escape sequences (colours, cursor moves) a guest's shell sends.
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# The console's banner once it is attached: input typed before it would be lost.
ATTACHED_RE = re.compile(r"Escape character is")
ATTACHED_TEXT = "Escape character"
# A shell prompt at the end of what the console printed.
PROMPT_RE = re.compile(r"[#$] $")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences and carriage returns."""
    return ANSI_RE.sub("", text).replace("\r", "")


def framed_command(command: str, tag: str) -> tuple[str, str, str]:
    """The line to type for ``command`` and its start and end markers.

    The markers are split in the typed line (``'TWx''xS'``), so only the command's own
    output contains them whole, never the echo of the line."""
    if "\n" in command:
        raise ValueError("run() takes one line; join commands with ';'")
    start, end = f"TW{tag}S", f"TW{tag}E"
    line = (
        f"printf '%s\\n' '{start[:3]}''{start[3:]}'; {command}; "
        f"printf '%s\\n' '{end[:3]}''{end[3:]}'\r"
    )
    return line, start, end


def framed_output(output: str, start: str, end: str) -> str:
    """What the command printed between its markers."""
    text = strip_ansi(output)
    body = text.split(f"{start}\n", 1)[-1].split(f"{end}\n", 1)[0]
    return body.rstrip("\n")
