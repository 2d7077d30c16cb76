"""Manual pages (roff source, ``man`` and ``mdoc`` macros) to plain text, for the offline corpus.

Not a roff formatter: it keeps the words of a page and drops the markup, which is what a
language-model corpus needs, in pure Python (hundreds of pages per second, no ``groff`` needed,
the same output on every machine). What it does:

* Requests and macros (lines starting with ``.`` or ``'``): paragraph macros (``.PP``, ``.LP``,
  ``.P``, ``.TP``, ``.sp``, ``.Pp``, ...) become a blank line; headings (``.SH``, ``.SS``,
  ``.Sh``, ``.Ss``) become their text on a line of its own after a blank line; font macros
  (``.B``, ``.I``, ``.BR``, ``.IR``, ...) become their arguments (joined without spaces for the
  alternating ones); ``mdoc`` macros (``.Nm``, ``.Op Fl a``, ``.Xr ls 1``) become their arguments
  with the macro names among them dropped (``Fl x`` becomes ``-x``); ``.IP tag`` keeps its tag;
  every other request (``.TH``, ``.de``/``.ig`` blocks, ``.if``/``.ie`` conditionals, ``.nr``,
  ``.ds``, ``.RS``, ...) is dropped.
* Escapes: fonts, sizes, registers, strings, motions are dropped; special characters
  (``\\(em``, ``\\[u00E9]``, ``\\(:u``, ``\\-``, ...) become their Unicode characters;
  comments (``\\"``) are removed.
* ``tbl`` tables (``.TS``/``.TE``) keep their cells (tab-separated), not their format lines.

A page whose first request is ``.so other-page`` is an alias: :func:`roff_to_text` returns
``None`` for it, so a corpus does not count the target page twice.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["roff_to_text"]

_PARAGRAPH = frozenset("PP LP P TP TQ HP sp br bp Pp Lp Bl El It".split())
_HEADING = frozenset("SH SS Sh Ss".split())
_FONT = frozenset("B I SM SB".split())
_FONT_ALTERNATING = frozenset("BR BI IB IR RB RI".split())
# Blocks skipped up to their end marker: macro definitions and ignored input.
_BLOCK_END = {"de": "..", "de1": "..", "am": "..", "ig": ".."}
# mdoc macros that can appear as arguments of other mdoc macros (dropped from the text).
_MDOC_CALLABLE = frozenset(
    (
        "Ac Ad An Ao Ap Aq Ar At Bc Bo Bq Brc Bro Brq Bsx Bx Cd Cm Dc Do Dq Dv Dx Ec Em En Eo "
        "Er Ev Fa Fc Fl Fn Fo Fr Ft Fx Ic Li Lk Ms Mt Nm No Ns Nx Oc Oo Op Ox Pa Pc Pf Po Pq Qc "
        "Ql Qo Qq Sc So Sq St Sx Sy Ta Tn Ux Va Vt Xc Xo Xr"
    ).split()
)
_MDOC_NAME = re.compile(r"^[A-Z][a-z][a-z]?$")

# Special characters by name (groff_char(7)); accented letters are composed generically below.
_SPECIAL = {
    "em": "\u2014",
    "en": "\u2013",
    "hy": "-",
    "mi": "\u2212",
    "pl": "+",
    "eq": "=",
    "bu": "\u2022",
    "aq": "'",
    "aa": "\u00b4",
    "ga": "`",
    "dq": '"',
    "lq": "\u201c",
    "rq": "\u201d",
    "oq": "\u2018",
    "cq": "\u2019",
    "Fo": "\u00ab",
    "Fc": "\u00bb",
    "fo": "\u2039",
    "fc": "\u203a",
    "co": "\u00a9",
    "rg": "\u00ae",
    "tm": "\u2122",
    "de": "\u00b0",
    "sc": "\u00a7",
    "ps": "\u00b6",
    "mu": "\u00d7",
    "di": "\u00f7",
    "+-": "\u00b1",
    ">=": "\u2265",
    "<=": "\u2264",
    "!=": "\u2260",
    "==": "\u2261",
    "->": "\u2192",
    "<-": "\u2190",
    "ss": "\u00df",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
    "sl": "/",
    "or": "|",
    "ba": "|",
    "lB": "[",
    "rB": "]",
    "lC": "{",
    "rC": "}",
    "la": "\u27e8",
    "ra": "\u27e9",
    "Do": "$",
    "Eu": "\u20ac",
    "eu": "\u20ac",
    "ct": "\u00a2",
    "Po": "\u00a3",
    "Ye": "\u00a5",
    "OK": "\u2713",
}
# Predefined strings (\*(lq ...): quotes of man/mdoc; anything else expands to nothing.
_STRINGS = {
    "lq": "\u201c",
    "rq": "\u201d",
    "Lq": "\u201c",
    "Rq": "\u201d",
    "Aq": "'",
    "R": "\u00ae",
    "Tm": "\u2122",
}
# Two-character accent names: first character -> combining mark (\(:u = u with diaeresis).
_ACCENTS = {
    ":": "\u0308",
    "'": "\u0301",
    "`": "\u0300",
    "^": "\u0302",
    "~": "\u0303",
    ",": "\u0327",
    "o": "\u030a",
    "v": "\u030c",
}
_SINGLE = {
    "-": "-",
    "e": "\\",
    " ": " ",
    "~": " ",
    "0": " ",
    "t": "\t",
    "'": "'",
    "`": "`",
    ".": ".",
}
_SINGLE_DROPPED = frozenset("&|^%c:/,)!{}dprau")

_NAME = r"(?:\[[^\]]*\]|\(..|.)"
_ESCAPE = re.compile(
    r"\\(?:"
    rf"(?P<font>f{_NAME})"
    r"|(?P<size>s[+-]?(?:\(\d\d|\[\d+\]|\d))"
    rf"|(?P<string>\*{_NAME})"
    rf"|(?P<register>n[+-]?{_NAME})"
    r"|(?P<quoted>[hvwlLDoxXbkzZHSRNCY]'[^']*')"
    rf"|(?P<mark>[kgmMVF]{_NAME})"
    r"|(?P<char>\(..|\[[^\]]*\]|C'[^']*')"
    r"|(?P<single>.)"
    r")",
    re.DOTALL,
)


def _special(name: str) -> str:
    if name in _SPECIAL:
        return _SPECIAL[name]
    if len(name) == 2 and name[0] in _ACCENTS:
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if name.startswith("u") and len(name) >= 5:  # \[u00E9], \[u0041_0301]
        try:
            return "".join(chr(int(part, 16)) for part in name[1:].split("_"))
        except ValueError:
            return ""
    if len(name) == 1:
        return name
    return ""


def _unescape(match: re.Match[str]) -> str:
    kind = match.lastgroup
    text = match.group(kind)
    if kind == "char":
        if text.startswith("("):
            return _special(text[1:])
        if text.startswith("["):
            return _special(text[1:-1])
        return _special(text[2:-1])  # C'name'
    if kind == "string":
        name = text[1:]
        name = name[1:] if name.startswith("(") else name.strip("[]")
        return _STRINGS.get(name, "")
    if kind == "single":
        if text in _SINGLE:
            return _SINGLE[text]
        if text == "\\":
            return "\\"
        return "" if text in _SINGLE_DROPPED else text
    return ""  # fonts, sizes, registers, motions, marks


def _strip_comment(line: str) -> str:
    """Remove a ``\\"`` or ``\\#`` comment (an escaped backslash before it does not start one)."""
    i = 0
    while True:
        i = line.find("\\", i)
        if i < 0 or i + 1 >= len(line):
            return line
        if line[i + 1] in '"#':
            return line[:i]
        i += 2


def unescape(text: str) -> str:
    """Replace roff escapes in a line of text by their characters (or nothing)."""
    return _ESCAPE.sub(_unescape, text)


def _split_args(text: str) -> list[str]:
    """Macro arguments: whitespace-separated, ``"double quoted"`` ones may hold spaces."""
    args, current, quoted, has_token = [], [], False, False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            has_token = True
            i += 2
            continue
        if ch == '"':
            if quoted and i + 1 < len(text) and text[i + 1] == '"':
                current.append('"')
                i += 2
                continue
            quoted = not quoted
            has_token = True
        elif ch in " \t" and not quoted:
            if has_token:
                args.append("".join(current))
            current, has_token = [], False
        else:
            current.append(ch)
            has_token = True
        i += 1
    if has_token:
        args.append("".join(current))
    return args


def _mdoc_text(args: list[str]) -> str:
    words: list[str] = []
    flag = False
    for arg in args:
        if arg in _MDOC_CALLABLE:
            flag = arg == "Fl"
            continue
        words.append(("-" + arg) if flag else arg)
        flag = False
    return " ".join(words)


def roff_to_text(source: str) -> str | None:
    """Plain text of a manual page's roff source (see the module docstring for the rules).

    Args:
        source: The page's roff source (decoded).

    Returns:
        The text (paragraphs separated by one blank line, no trailing whitespace), or ``None``
        if the page is an alias (``.so``).
    """
    out: list[str] = []
    fill = True  # filled text: consecutive lines of a paragraph join into one line
    block_end: str | None = None
    in_brace = 0
    table_format = False
    tag_next = False  # after .TP: the next line is a tag, on a line of its own
    joinable = False  # whether the next filled text may join the last output line

    def emit(text: str) -> None:
        nonlocal tag_next, joinable
        if fill and joinable and out and out[-1] and not text.startswith((" ", "\t")):
            out[-1] += " " + text
        else:
            out.append(text)
        joinable = not tag_next
        tag_next = False

    def new_line(blank: bool) -> None:
        nonlocal joinable
        if blank:
            out.append("")
        joinable = False

    for raw in source.splitlines():
        if block_end is not None:
            if raw.strip() == block_end:
                block_end = None
            continue
        line = _strip_comment(raw)
        if in_brace:  # inside a multi-line conditional body: skipped
            in_brace = max(in_brace + line.count("\\{") - line.count("\\}"), 0)
            continue
        if table_format:  # tbl options and format lines end with '.'
            if line.rstrip().endswith("."):
                table_format = False
            continue
        if line[:1] in (".", "'"):
            body = line[1:].lstrip()
            if not body:
                continue
            name, _, rest = body.partition(" ")
            name = name.split("\t", 1)[0]
            if name == "so":
                if not "".join(out).strip():
                    return None
                continue
            if name in _BLOCK_END:
                block_end = _BLOCK_END[name]
                continue
            if name in ("if", "ie", "el", "while"):
                in_brace = max(line.count("\\{") - line.count("\\}"), 0)
                continue
            if name in ("nf", "EX", "TS", "Bd"):
                fill = False
                table_format = name == "TS"
                new_line(blank=True)
                continue
            if name in ("fi", "EE", "TE", "Ed"):
                fill = True
                new_line(blank=True)
                continue
            args = _split_args(rest)
            if name in _PARAGRAPH:
                new_line(blank=name not in ("br", "TQ"))
                tag_next = name in ("TP", "TQ")
            elif name == "IP":
                new_line(blank=True)
                if args:
                    out.append(unescape(args[0]))
            elif name in _HEADING:
                new_line(blank=True)
                out.append(unescape(" ".join(args)))
                new_line(blank=False)
            elif name in _FONT:
                emit(unescape(" ".join(args)))
            elif name in _FONT_ALTERNATING:
                emit(unescape("".join(args)))
            elif name in ("UR", "MT"):
                emit(unescape(" ".join(args)))
            elif _MDOC_NAME.match(name) and name not in ("Dd", "Dt", "Os"):
                text = _mdoc_text(args)
                if text:
                    emit(unescape(text))
            continue
        if line.strip() in ("T{", "T}"):
            continue
        text = unescape(line.replace("T{", "").replace("T}", ""))
        if fill and not text.strip():
            new_line(blank=True)
        else:
            emit(text)
    text = "\n".join(part.rstrip() for part in out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")
