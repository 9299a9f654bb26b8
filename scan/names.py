"""How a name (a file, folder, class or archive member name, a path) is shown: one readable, lossless form.

A name is the `str` the operating system gives, with each byte that does not decode held as a surrogate escape
(U+DC80-U+DCFF, Python's "surrogateescape"); that `str` opens the file. Everywhere a name is shown (the terminal,
clusters.csv, report.html, the figures) it is `display_name(name)`: the name as it reads, except that a backslash
is doubled, a byte that does not decode is `\\xff`, and a character that would act instead of being seen (a newline,
a tab, ESC, DEL, the C1 controls, bidirectional overrides and other format characters, line and paragraph
separators; not the zero-width joiners that words and emoji need) is an escape: `\\n`, `\\r`, `\\t`, `\\x1b` (below 0x80), `\\u202e`, `\\U000e0001`. So the shown form is
one line, never drives a terminal, and `original_name` gives the name back: `os.fsencode(original_name(shown))` are
the name's bytes.
"""

import re
import unicodedata

ESCAPED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # controls, format characters, surrogates, line/paragraph breaks
# Format characters that only join letters (Persian and Indic words, emoji sequences): kept, as they are read.
JOINERS = {"\u200c", "\u200d"}  # zero-width non-joiner and joiner
SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
ESCAPE = re.compile(r"\\(?:([\\nrt])|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def escaped_character(character):
    """The escape that shows one character of a name (see the module's docstring)."""
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that did not decode, held by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def display_name(name):
    """`name` in its readable, lossless, one-line form: see the module's docstring."""
    if name.isprintable() and "\\" not in name:  # nearly every name: nothing to escape
        return name
    return "".join(
        SHORT_ESCAPES.get(character)
        or (
            escaped_character(character)
            if unicodedata.category(character) in ESCAPED_CATEGORIES and character not in JOINERS
            else character
        )
        for character in name
    )


def original_name(shown):
    """The name that `display_name` showed as `shown` (a \\xNN from 0x80 up is the undecodable byte NN)."""

    def unescape(match):
        short, byte, code, long_code = match.groups()
        if short:
            return {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}[short]
        if byte:
            return chr(int(byte, 16) + (0xDC00 if int(byte, 16) >= 0x80 else 0))
        return chr(int(code or long_code, 16))

    return ESCAPE.sub(unescape, shown)
