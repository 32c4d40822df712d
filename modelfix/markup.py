"""Escaping and formatting shared by every report writer: HTML and Markdown escaping, percentages, PNG data URLs.

A low module (it imports nothing from modelfix): report.md, report.html, the comparison and the galleries all
escape through here, so a class name, a path or a string from results.json can never become markup or a link.
"""

from __future__ import annotations

import base64
import binascii
import html
import math
import re

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_PREFIX = "data:image/png;base64,"

# Markdown's punctuation that can start markup anywhere in a line (emphasis, code, links, images, table cells,
# HTML, entities). `.`, `-` and `+` only matter at the start of a line, where the writers never put user text.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#|<>&~!])")


def escape_html(value) -> str:
    """`str(value)` with &, <, >, " and ' escaped (safe in element text and in quoted attributes)."""
    return html.escape(str(value), quote=True)


def escape_md(value) -> str:
    """`str(value)` safe as inline Markdown text: every character that can start markup (including `<`, `[`,
    `(`, `|`, `*`, `` ` ``) is backslash-escaped and line breaks become spaces, so a user string renders as
    itself in any CommonMark/GFM viewer — never as HTML, a link, an image or a table cell boundary."""
    text = " ".join(str(value).splitlines())
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_code(value) -> str:
    """`str(value)` as an inline code span for running text (not table cells: GFM splits cells at `|` before it
    reads code spans; use escape_md there): the fence is longer than any backtick run inside (CommonMark), so the
    content stays literal."""
    text = " ".join(str(value).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def number(value) -> float | None:
    """A finite float, or None for missing, NaN, infinite, boolean and non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def pct(value) -> str:
    """A fraction as a percentage with 2 decimals; "–" for missing, NaN and non-numeric values."""
    value = number(value)
    return "–" if value is None else f"{100 * value:.2f}"


def signed_points(before, after) -> str:
    """The change after − before in percentage points with an explicit sign ("+3.10", "-0.78"), so that a rise
    reads as a rise; "–" if either is missing."""
    a, b = number(before), number(after)
    if a is None or b is None:
        return "–"
    return f"{100 * (b - a):+.2f}"


def png_base64(value) -> str | None:
    """The base64 text of a PNG given as base64 (optionally a data: URL) or as bytes; None if it is not a PNG."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value[len(PNG_PREFIX):] if value.startswith(PNG_PREFIX) else value
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None
    else:
        return None
    return base64.b64encode(raw).decode("ascii") if raw.startswith(PNG_MAGIC) else None


def png_data_url(value) -> str | None:
    """A `data:image/png;base64,…` URL for a PNG (bytes, base64 or a data URL), None if it is not a PNG."""
    data = png_base64(value)
    return None if data is None else PNG_PREFIX + data
