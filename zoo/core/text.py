"""Text from files shown on a terminal: class names, model names and paths escaped so that they
print as what they are (one line, no terminal commands).

Ground layer: the commands print through it; what is stored (a folder's record, `--json`) stays exact.
"""

from __future__ import annotations

import re

# C0 controls (ESC, newline, CR, tab, ...), DEL, C1 controls, lone surrogates (no encoding can
# write them), the line and paragraph separators, and the bidirectional overrides, embeddings
# and isolates that reorder what follows them on screen.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with every character a terminal would act on written as Python writes it in a
    string literal (`\\x1b`, `\\n`, `\\t`, `\\u202e`): the rest, any script or emoji, unchanged.

    Args:
        text: a class name, a model name, a path (anything else is shown as `str()` of it).
    """
    return _UNSAFE.sub(lambda found: found[0].encode("unicode_escape").decode("ascii"), str(text))


def printable_lines(text: str) -> str:
    """`text` as `printable` writes each of its lines: the line breaks a message was written
    with stay, and nothing inside a line can start another."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


__all__ = ["printable", "printable_lines"]
