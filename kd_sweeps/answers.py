"""The final answer of a reasoning text: the content of its last ``\\boxed{...}``.

Both the datasets (a record's answer when its schema has none, ``kd_sweeps.sources``) and the
benchmarks (answer checking, ``kd_sweeps.benchmarks``) read answers this way.
"""

from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox``), braces balanced; None if none.

    A regex cannot match nested braces (``\\boxed{\\frac{\\sqrt{2}}{2}}``), so braces are counted.
    An unclosed box (a generation cut off mid-answer) does not count.
    """
    found = None
    for match in _BOX_COMMAND.finditer(text):
        start = match.end()
        if start >= len(text) or text[start] != "{":
            continue
        depth = 0
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start + 1:pos]
                    break
    return found.strip() if found is not None else None
