"""What people read: rich tables and lines, with every value from the API shown as inert
text (control characters escaped, never parsed as rich markup), and JSON for scripts."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# C0, DEL, C1, and the format/separator characters that reorder or hide text (bidi
# overrides, zero-width joiners, line/paragraph separators)
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"
)


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def has_controls(data: bytes) -> bool:
    """Bytes a terminal would act on (escapes, C1 controls) rather than show."""
    return re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]", data) is not None


def clean(value: object) -> str:
    """``value`` as one line of text a terminal shows as is: control and invisible
    formatting characters become ``\\xNN`` / ``\\uNNNN``."""
    text = "" if value is None else str(value)
    return _UNSAFE.sub(_escape, text)


def text(value: object, style: str = "") -> Text:
    """An inert rich ``Text`` (markup such as ``[bold]`` stays literal)."""
    return Text(clean(value), style=style)


# a pipe or a file has no width: wide enough that a table's rows stay one line each
PIPE_WIDTH = 220


def console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False, width=width)


def out_json(doc: Any) -> None:
    """One JSON document on stdout (``--json``)."""
    # ASCII only: C1 controls and bidi overrides in the API's strings come out escaped
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def out_json_line(doc: Any) -> None:
    """One JSON object per line (``--json`` of tail/watch commands)."""
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# columns whose values are long and free-form: they give way (with an ellipsis) when the
# screen is narrow; every other column keeps its values whole
WIDE_COLUMNS = frozenset(
    {"path", "url", "host", "error", "errors", "data", "differences", "filter", "changed",
     "description", "name", "rule", "action", "detail", "listen"}
)  # fmt: skip


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], title: str = "") -> Table:
    """A compact table, one line per row. Only the free-form columns (``WIDE_COLUMNS``)
    shrink on a narrow screen, ending in an ellipsis; ids, statuses and times stay whole
    (an id is what the next command takes). Cells are made inert unless already ``Text``."""
    cells = [[c if isinstance(c, Text) else text(c) for c in row] for row in rows]
    longest = [
        max([len(name), *(c.cell_len for row in cells for c in row[i : i + 1])])
        for i, name in enumerate(columns)
    ]
    wide = [i for i, name in enumerate(columns) if name in WIDE_COLUMNS]
    fixed = sum(w for i, w in enumerate(longest) if i not in wide) + 2 * len(columns)
    share = max(12, (console().width - fixed) // max(1, len(wide)))
    t = Table(title=title or None, box=None, header_style="bold", pad_edge=False)
    for i, name in enumerate(columns):
        if i in wide:
            t.add_column(name, no_wrap=True, overflow="ellipsis", max_width=share)
        else:
            t.add_column(name, no_wrap=True, overflow="fold", min_width=longest[i])
    for row in cells:
        t.add_row(*row)
    return t


# -- formats ----------------------------------------------------------------------------------
def when(epoch: object, full: bool = False) -> str:
    if not isinstance(epoch, (int, float)):
        return ""
    fmt = "%Y-%m-%d %H:%M:%S" if full else "%H:%M:%S"
    return time.strftime(fmt, time.localtime(epoch))


def size(n: object) -> str:
    if not isinstance(n, int):
        return ""
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def duration(ms: object) -> str:
    if not isinstance(ms, (int, float)):
        return ""
    return f"{ms:.0f}ms" if ms < 10_000 else f"{ms / 1000:.1f}s"


def status_text(status: object, state: object = None) -> Text:
    if status is None:
        return text(state or "", "dim")
    s = int(status) if isinstance(status, int) else 0
    style = "green" if s < 300 else "yellow" if s < 400 else "red"
    return Text(str(status), style=style)


# -- flows -----------------------------------------------------------------------------------
FLOW_COLUMNS = ("time", "method", "status", "host", "path", "size", "duration", "replica", "id")


def flow_row(f: dict[str, Any]) -> list[object]:
    return [
        when(f.get("started_at")),
        f.get("method"),
        status_text(f.get("status"), f.get("state")),
        f.get("host"),
        f.get("path"),
        size(f.get("response_size")),
        duration(f.get("duration_ms")),
        f.get("replica"),
        f.get("id"),
    ]


def flow_event_line(e: dict[str, Any]) -> Text:
    """One live flow event (``flows tail``)."""
    timings = e.get("timings") or {}
    resp = e.get("response") or {}
    status = resp.get("status")
    line = Text()
    line.append(when(timings.get("start")) + " ")
    line.append(f"{clean(e.get('event')):<9} ", style="dim")
    line.append(f"{clean(e.get('method'))} ")
    line.append_text(status_text(status, e.get("state")))
    port = e.get("port")
    scheme = e.get("scheme") or "http"
    default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    url = f"{scheme}://{e.get('host')}{'' if default or port is None else f':{port}'}"
    line.append(" " + clean(url + str(e.get("path") or "")))
    if e.get("error"):
        line.append(" " + clean(e["error"]), style="red")
    line.append(f"  {clean(e.get('replica'))} {clean(e.get('id'))}", style="dim")
    return line


def headers_table(pairs: object) -> Table:
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="cyan", no_wrap=True)
    t.add_column(overflow="fold")
    if isinstance(pairs, list):
        for pair in pairs:
            if isinstance(pair, list) and len(pair) == 2:
                t.add_row(text(pair[0], "cyan"), text(pair[1]))
    return t


def body_preview(part: dict[str, Any], limit: int = 4096) -> Text | None:
    body = part.get("body")
    if body is None:
        return text("(body not available while the flow is active)", "dim")
    if body == "":
        return None
    if part.get("encoding") == "base64":
        note = f"({part.get('size', '?')} bytes, binary: --body to write them out)"
        return text(note, "dim")
    shown = body[:limit]
    out = Text()
    for i, line in enumerate(shown.split("\n")):
        if i:
            out.append("\n")
        out.append(clean(line.replace("\r", "")))  # a line each, escapes inert
    if len(body) > limit:
        out.append(f"\n… ({len(body)} characters in all)", style="dim")
    return out


def key_value_lines(pairs: Iterable[tuple[str, object]]) -> Text:
    out = Text()
    for i, (k, v) in enumerate(pairs):
        if i:
            out.append("\n")
        out.append(f"{k}: ", style="bold")
        out.append(clean(v))
    return out
