"""How torch_kvreg's objects show themselves in notebooks (HTML) and terminals (text).

Rendering never raises: a field that cannot be read (a cache unregistered meanwhile, say)
shows as such instead.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

_STYLE = "border-collapse:collapse;font-family:monospace;font-size:12px"
_CELL = "border:1px solid #ccc;padding:2px 6px;text-align:left"


def card(title: str, fields: Callable[[], Sequence[tuple[str, object]]]) -> str:
    """An HTML table of (name, value) rows under a title; ``fields`` is called inside a guard."""
    try:
        rows = list(fields())
    except Exception as exc:  # noqa: BLE001  (rendering must not raise)
        rows = [("unavailable", f"{type(exc).__name__}: {exc}")]
    body = "".join(
        f"<tr><th style='{_CELL}'>{html.escape(str(name))}</th><td style='{_CELL}'>{html.escape(str(value))}</td></tr>"
        for name, value in rows
    )
    return (
        f"<table style='{_STYLE}'><caption style='text-align:left'><b>{html.escape(title)}</b></caption>{body}</table>"
    )


class Table:
    """Rows of named columns: an aligned text table in a terminal, an HTML table in Jupyter.

    >>> t = Table(["id", "bytes"], [[1, "64 B"], [12, "2.00 KiB"]])
    >>> print(t)
    id  bytes
    --  --------
    1   64 B
    12  2.00 KiB
    """

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[object]]):
        self.columns = [str(c) for c in columns]
        self.rows = [[str(v) for v in row] for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        widths = [max([len(c)] + [len(row[i]) for row in self.rows]) for i, c in enumerate(self.columns)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in self.rows]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='{_CELL}'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td style='{_CELL}'>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows
        )
        if not self.rows:
            body = f"<tr><td style='{_CELL}' colspan='{len(self.columns)}'>(none)</td></tr>"
        return f"<table style='{_STYLE}'><tr>{head}</tr>{body}</table>"
