"""Text as the terminal shows it: names and paths from the user's files printed safely, paths quoted to copy."""

from __future__ import annotations

import re
import shlex

# Control characters other than newline and tab: in a file name they would reach the terminal as commands (ESC
# sequences recolour, move the cursor or retitle the window), so they are shown escaped, as \x1b.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """text with its control characters written out (\x1b), safe to print to a terminal."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def shown_path(path) -> str:
    """A path as a command line to copy should have it: quoted for the shell when it needs to be (spaces, quotes),
    in bash's $'...' form when it holds control characters, which then appear written out."""
    text = str(path)
    if CONTROL_CHARACTERS.search(text):
        return "$'" + printable(text.replace("\\", "\\\\").replace("'", "\\'")) + "'"
    return shlex.quote(text)
