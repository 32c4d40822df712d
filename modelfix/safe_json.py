"""JSON from files modelfix did not write (cards, sidecars, config.json), parsed with bounds.

Python's parser recurses once per nesting level, so a document nested 100,000 levels deep raises RecursionError
(or worse) instead of a user error; the depth is checked first by a flat scan, so every refusal is a
`ModelfixError` naming what was read.
"""

from __future__ import annotations

import json
import re

from modelfix.errors import ModelfixError

MAX_DEPTH = 64  # a model card nests about 5 levels; timm's config.json about 3
MAX_CHARS = 64 * 2**20
_STRING = re.compile(r'"(?:\\.|[^"\\])*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def depth(text: str) -> int:
    """The deepest nesting of arrays/objects in `text`, brackets inside strings ignored (no recursion)."""
    deepest = level = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        level += 1 if bracket in "[{" else -1
        deepest = max(deepest, level)
    return deepest


def loads(text: str | bytes, what: str, max_depth: int = MAX_DEPTH, error=ModelfixError):
    """`json.loads(text)` for the document `what` (a file name or a description), refusing text longer than
    MAX_CHARS, nesting deeper than `max_depth` and invalid JSON, each as one `error` naming `what`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 text ({exc})") from None
    if len(text) > MAX_CHARS:
        raise error(f"{what} is {len(text):,} characters long, above the limit of {MAX_CHARS:,}")
    found = depth(text)
    if found > max_depth:
        raise error(f"{what} nests {found} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({exc})") from None
