"""Privacy by design: keyed pseudonyms, a scrubber for one patient's identifiers, one-line text.

Pseudonymised datasets (DICOM always, any other with ``--pseudonymize``) never write a real
path: ids are keyed hashes (HMAC-SHA256 with the workdir's key, kept in the one private file,
`curation.privacy.private_map`), and text that could carry identifiers (error lines, header text)
passes `Scrubber`, which knows the patient's names, IDs, accession numbers and dates in any
case, order, separator and common spelling (initials, "jdoe", m/d/yy ...), and, for free text,
`generic_scrub`, which removes what merely looks like an identifier (dates, long digit runs,
"MRN: ...", DICOM ``Family^Given`` names).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Iterable

from curation.privacy.patterns import date_patterns, generic_scrub, initials_patterns, spaced_chars

REDACTED = "<redacted>"  # no brackets: rich would read [..] as markup
SEP = r"[\W_]*"  # any run of separators (space, ^, _, -, ., /, ...) or none
_NOT_LETTER_BEFORE = r"(?<![^\W\d_])"
_NOT_LETTER_AFTER = r"(?![^\W\d_])"
MIN_DIGITS = 4  # shorter standalone numbers are too common to scrub (slice 12, 3 mm...)
MAX_PERMUTED = 4  # name parts beyond this are matched one by one only
_RUNS = re.compile(r"<redacted>(?:[ _^,.\-]*<redacted>)+")  # "doe_john" -> one <redacted>

__all__ = ["REDACTED", "Scrubber", "generic_scrub", "identifier_patterns", "keyed_hash", "one_line", "redact"]


def keyed_hash(key: bytes, text: str, n: int = 16) -> str:
    """HMAC-SHA256 of ``text`` under the workdir key, as ``n`` hex digits."""
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:n]


def one_line(text: object, limit: int = 1000) -> str:
    """``text`` on one line: newlines, tabs and other control characters escaped (\\n, \\x1b);
    undecodable file-name bytes (surrogate escapes) as \\xNN."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 32 or code == 127:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _atoms(value: str) -> list[str]:
    return [a for a in re.split(r"[\W_]+", value) if a]


def identifier_patterns(value: str, kind: str = "name") -> set[str]:
    """Regex alternatives that match ``value`` in any case, order and separator.

    ``kind`` is "name" (person names: parts in any order, initials "J. D.", "jdoe"), "id"
    (patient/accession/other IDs, also with separators inserted: "445-566"), "date" (DA/DT
    values, in any common format), "phrase" (institution, address: the whole value, any
    separator) or "uid" (matched whole only).
    """
    value = str(value).strip()
    if not value:
        return set()
    if kind == "uid":
        return {re.escape(value)} if len(value) >= 8 else set()
    pats: set[str] = set()
    atoms = _atoms(value)
    if kind == "date":
        digits = re.sub(r"\D", "", value)[:8]
        return set(date_patterns(digits)) if len(digits) == 8 else set()
    # the whole value, with any separator between its parts (and between letter/digit runs)
    runs = [r for a in atoms for r in re.findall(r"[^\W\d_]+|\d+", a)]
    if kind == "phrase":
        return {SEP.join(map(re.escape, runs))} if len("".join(runs)) >= 4 else set()
    if len(runs) > 1 and len("".join(runs)) >= 3:
        orders = itertools.permutations(runs) if kind == "name" and len(runs) <= MAX_PERMUTED else [runs]
        pats |= {SEP.join(map(re.escape, order)) for order in orders}
    for run in runs:
        if run.isdigit():
            if len(run) == 8:
                pats |= set(date_patterns(run))
            if len(run) >= MIN_DIGITS:
                pats.add(rf"(?<!\d){re.escape(run)}(?!\d)")
                pats.add(rf"(?<!\d){spaced_chars(run)}(?!\d)")  # 445-566, 44 55 66
        elif len(run) >= 2:
            pats.add(_NOT_LETTER_BEFORE + re.escape(run) + _NOT_LETTER_AFTER)
    for atom in atoms:  # mixed atoms such as MRN112233 or ACC55501, whole (and spaced out)
        if len(atom) >= 3 and not atom.isalpha():
            pats.add(re.escape(atom))
            if sum(c.isdigit() for c in atom) >= MIN_DIGITS:
                pats.add(_NOT_LETTER_BEFORE + spaced_chars(atom) + r"(?![^\W_])")
    if kind == "name":
        words = [r for r in runs if not r.isdigit() and len(r) >= 2]
        pats |= initials_patterns(words[:MAX_PERMUTED])
    return pats


class Scrubber:
    """Replaces one patient's (or a few patients') identifiers in text by ``<redacted>``.

    Built from tagged header values, e.g. ``Scrubber([("name", "Doe^John"), ("id", "MRN112233"),
    ("date", "19450102")])``; matches ``doe_john``, ``JOHN DOE``, ``J. D.``, ``jdoe``,
    ``mrn-112233``, ``112-233``, ``1945-01-02``, ``1/2/45`` and ``02.01.1945`` alike.
    ``generic=True`` also removes what merely looks like an identifier (`generic_scrub`): for
    text that may hold free-text header values of a patient whose name fields are empty.
    """

    def __init__(self, identifiers: Iterable[tuple[str, str]] = (), generic: bool = False) -> None:
        self.identifiers = sorted({(k, str(v)) for k, v in identifiers if str(v).strip()})
        self.generic = generic
        pats: set[str] = set()
        for kind, value in self.identifiers:
            pats |= identifier_patterns(value, kind)
        self._regex = re.compile("|".join(sorted(pats, key=lambda p: (-len(p), p))), re.IGNORECASE) if pats else None

    def __bool__(self) -> bool:
        return self._regex is not None or self.generic

    def __call__(self, text: str, keep_hashes: bool = True) -> str:
        if not text:
            return text
        if self._regex is not None:
            text = _RUNS.sub(REDACTED, self._regex.sub(REDACTED, text))
        if self.generic:
            text = _RUNS.sub(REDACTED, generic_scrub(text, keep_hashes=keep_hashes))
        return text

    def with_generic(self) -> Scrubber:
        """The same identifiers, plus `generic_scrub`."""
        return self if self.generic else Scrubber(self.identifiers, generic=True)

    def __reduce__(self):  # pickles as its inputs (compiled regexes are rebuilt in workers)
        return (Scrubber, (self.identifiers, self.generic))


def redact(text: str, replacements: Iterable[tuple[str, str]], scrubber: Scrubber | None = None) -> str:
    """Replace real paths (longest first) by their pseudonyms, scrub identifiers, keep one line.

    The pseudonyms are put in after scrubbing, so a keyed hash is never taken for an ID.
    """
    pseudonyms: list[str] = []
    for real, pseudo in sorted({(r, p) for r, p in replacements if r}, key=lambda rp: -len(rp[0])):
        if real in text:
            text = text.replace(real, f"\x00{len(pseudonyms)}\x00")
            pseudonyms.append(pseudo)
    if scrubber:
        text = scrubber(text)
    for n, pseudo in enumerate(pseudonyms):
        text = text.replace(f"\x00{n}\x00", pseudo)
    return one_line(text)
