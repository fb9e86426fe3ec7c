"""Client text quoted in error messages: one rule for every handler and for the Open Inference Protocol parser."""

import json

QUOTE_LIMIT = 60
"""Characters of client text quoted in an error message; the rest is elided."""


def quote(value, limit=QUOTE_LIMIT):
    """Client text for an error message: JSON-escaped (no raw control characters), at most ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    shown = json.dumps(text[:limit])
    return shown[:-1] + f'..." ({len(text)} characters)' if len(text) > limit else shown
