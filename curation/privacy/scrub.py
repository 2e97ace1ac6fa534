"""Privacy by design: keyed pseudonyms, a scrubber for one patient's identifiers, one-line text.

Pseudonymised datasets (DICOM always, any other with ``--pseudonymize``) never write a real
path: ids are keyed hashes (HMAC-SHA256 with the workdir's key, kept in the one private file,
`curation.privacy.private_map`), and text that could carry identifiers (error lines, header text)
passes `Scrubber`, which knows the patient's names, IDs, accession numbers and dates in any
case, order and separator, or is left out.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import itertools
import re
from typing import Iterable

REDACTED = "<redacted>"  # no brackets: rich would read [..] as markup
SEP = r"[\W_]*"  # any run of separators (space, ^, _, -, ., /, ...) or none
_NOT_LETTER_BEFORE = r"(?<![^\W\d_])"
_NOT_LETTER_AFTER = r"(?![^\W\d_])"
MIN_DIGITS = 4  # shorter standalone numbers are too common to scrub (slice 12, 3 mm...)
MAX_PERMUTED = 4  # name parts beyond this are matched one by one only
_RUNS = re.compile(r"<redacted>(?:[ _^,.\-]*<redacted>)+")  # "doe_john" -> one <redacted>


def keyed_hash(key: bytes, text: str, n: int = 16) -> str:
    """HMAC-SHA256 of ``text`` under the workdir key, as ``n`` hex digits."""
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:n]


def one_line(text: object, limit: int = 1000) -> str:
    """``text`` on one line: newlines, tabs and other control characters escaped (\\n, \\x1b)."""
    out = []
    for ch in str(text):
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _date_patterns(digits: str) -> list[str]:
    """YYYYMMDD as Y-M-D, D-M-Y and M-D-Y with any separator; [] when not a date."""
    try:
        _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return []
    y, m, d = digits[:4], digits[4:6], digits[6:]
    return [SEP.join(p) for p in ((y, m, d), (d, m, y), (m, d, y))]


def _atoms(value: str) -> list[str]:
    return [a for a in re.split(r"[\W_]+", value) if a]


def identifier_patterns(value: str, kind: str = "name") -> set[str]:
    """Regex alternatives that match ``value`` in any case, order and separator.

    ``kind`` is "name" (person names: parts in any order), "id" (patient/accession/other IDs),
    "date" (DA/DT values), "phrase" (institution, address: the whole value, any separator) or
    "uid" (matched whole only).
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
        return set(_date_patterns(digits)) if len(digits) == 8 else set()
    # the whole value, with any separator between its parts (and between letter/digit runs)
    runs = [r for a in atoms for r in re.findall(r"[^\W\d_]+|\d+", a)]
    if kind == "phrase":
        return {SEP.join(map(re.escape, runs))} if len("".join(runs)) >= 4 else set()
    if len(runs) > 1 and len("".join(runs)) >= 3:
        orders = itertools.permutations(runs) if kind == "name" and len(runs) <= MAX_PERMUTED else [runs]
        pats |= {SEP.join(map(re.escape, order)) for order in orders}
    for run in runs:
        if run.isdigit():
            if len(run) == 8 and _date_patterns(run):
                pats |= set(_date_patterns(run))
            if len(run) >= MIN_DIGITS:
                pats.add(rf"(?<!\d){re.escape(run)}(?!\d)")
        elif len(run) >= 2:
            pats.add(_NOT_LETTER_BEFORE + re.escape(run) + _NOT_LETTER_AFTER)
    for atom in atoms:  # mixed atoms such as MRN112233 or ACC55501, whole
        if len(atom) >= 3 and not atom.isalpha():
            pats.add(re.escape(atom))
    return pats


class Scrubber:
    """Replaces one patient's (or a few patients') identifiers in text by ``<redacted>``.

    Built from tagged header values, e.g. ``Scrubber([("name", "Doe^John"), ("id", "MRN112233"),
    ("date", "19450102")])``; matches ``doe_john``, ``JOHN DOE``, ``john-doe``, ``mrn-112233``,
    ``112233``, ``1945-01-02`` and ``02.01.1945`` alike.
    """

    def __init__(self, identifiers: Iterable[tuple[str, str]] = ()) -> None:
        self.identifiers = sorted({(k, str(v)) for k, v in identifiers if str(v).strip()})
        pats: set[str] = set()
        for kind, value in self.identifiers:
            pats |= identifier_patterns(value, kind)
        self._regex = re.compile("|".join(sorted(pats, key=lambda p: (-len(p), p))), re.IGNORECASE) if pats else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def __call__(self, text: str) -> str:
        if self._regex is None or not text:
            return text
        return _RUNS.sub(REDACTED, self._regex.sub(REDACTED, text))

    def __reduce__(self):  # pickles as its inputs (compiled regexes are rebuilt in workers)
        return (Scrubber, (self.identifiers,))


def redact(text: str, replacements: Iterable[tuple[str, str]], scrubber: Scrubber | None = None) -> str:
    """Replace real paths (longest first) by their pseudonyms, scrub identifiers, keep one line."""
    for real, pseudo in sorted({(r, p) for r, p in replacements if r}, key=lambda rp: -len(rp[0])):
        text = text.replace(real, pseudo)
    if scrubber:
        text = scrubber(text)
    return one_line(text)
