"""File names as people read them: the store keeps a name's raw bytes; text output and HTML show this instead.

A name that is not valid UTF-8 (Latin-1 bytes from an old archive) reaches Python as a ``str`` whose undecodable
bytes are lone surrogates (``os.fsdecode``); printed as they are they crash the terminal's encoder, and a newline
or an escape sequence in a name would forge output lines or drive the terminal. So, for display only:
undecodable bytes become U+FFFD, other unprintable characters their backslash escape (``\\n``, ``\\x1b``).
``--json`` output stays lossless instead: surrogates travel as ``\\udcXX`` escapes, and
``os.fsencode(json.loads(...))`` gives the original bytes back.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def display(text: str) -> str:
    """``text`` safe to print or to put in a page (HTML escaping is the template's job)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif "\ud800" <= ch <= "\udfff":
            out.append(REPLACEMENT)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
