"""The spellings the scrubber knows: dates in any common format, IDs with separators inserted,
initials, and what free text holds that merely looks like an identifier (`generic_scrub`)."""

from __future__ import annotations

import datetime as _dt
import itertools
import re

REDACTED = "<redacted>"
SEP = r"[\W_]*"  # any run of separators (space, ^, _, -, ., /, ...) or none
DATE_SEP = r"[\s./_\-]{1,3}"  # between the parts of a date written with separators
ID_SEP = r"[\s.\-_/]{0,2}"  # what may be inserted between the characters of an ID
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_LB, _LA = r"(?<![^\W\d_])", r"(?![^\W\d_])"  # no letter before / after
MIN_GENERIC_DIGITS = 6  # a run of this many digits in free text is taken for an ID


def _valid(y: int, m: int, d: int) -> bool:
    try:
        _dt.date(y, m, d)
        return True
    except ValueError:
        return False


def date_patterns(digits: str) -> list[str]:
    """YYYYMMDD in every common spelling: Y-M-D, D-M-Y and M-D-Y with any separator or none,
    unpadded and two-digit-year forms with a separator (1/2/70, 2.1.1970), month names
    (2 Jan 1970, January 2, 1970); [] when not a date."""
    if len(digits) != 8 or not digits.isdigit() or not _valid(int(digits[:4]), int(digits[4:6]), int(digits[6:])):
        return []
    y, m, d = digits[:4], digits[4:6], digits[6:]
    pats = [SEP.join(p) for p in ((y, m, d), (d, m, y), (m, d, y))]
    ys, ms, ds = f"(?:{y}|{y[2:]})", f"0?{int(m)}", f"0?{int(d)}"
    for order in ((ys, ms, ds), (ds, ms, ys), (ms, ds, ys)):
        pats.append(r"(?<!\d)" + DATE_SEP.join(order) + r"(?!\d)")
    mon = MONTHS[int(m) - 1] + r"[a-z]*\.?"
    pats.append(rf"(?<!\d){ds}(?:st|nd|rd|th)?[\s\-.,/]*{mon}[\s\-.,/]*{ys}(?!\d)")
    pats.append(rf"{_LB}{mon}[\s\-.,/]*{ds}(?:st|nd|rd|th)?[\s\-.,/]*{ys}(?!\d)")
    pats.append(rf"(?<!\d){ys}[\s\-.,/]*{mon}[\s\-.,/]*{ds}(?!\d)")
    return pats


def spaced_chars(value: str) -> str:
    """``value`` with up to two separators allowed between any two characters (445-566, M R N)."""
    return ID_SEP.join(re.escape(c) for c in value)


def initials_patterns(words: list[str]) -> set[str]:
    """Initials with dots in any order (J. D., J.D., D.J.), and an initial run into another
    name part (jdoe, doej, johnd)."""
    pats: set[str] = set()
    if len(words) < 2:
        return pats
    for order in itertools.permutations(words):
        letters = [re.escape(w[0]) for w in order]
        pats.add(_LB + r"\.[\s_^\-]*".join(letters) + r"\.?" + _LA)
    for a, b in itertools.permutations(words, 2):
        if len(b) >= 2:
            pats.add(_LB + re.escape(a[0]) + r"[._]?" + re.escape(b) + _LA)
            pats.add(_LB + re.escape(b) + r"[._]?" + re.escape(a[0]) + _LA)
    return pats


# --------------------------------------------------------------------------- free text

_MONTH = r"(?:" + "|".join(MONTHS) + r")[a-z]*\.?"
_LABELLED_ID = re.compile(
    r"(?i)\b(?P<label>MRN|MR\s*(?:no|nr|#)|PID|patient\s*id|acc(?:ession)?(?:\s*(?:no|nr|number|#))?|"
    r"dob|d\.o\.b\.?|birth\s*date|date\s*of\s*birth|born|ssn|ID(?=\s*[:#=]))"
    r"(?P<sep>\s*(?:[:#=]|no\.?|nr\.?|number)?\s*)(?P<value>[\w./\-]*\d[\w./\-]*)")
_LABELLED_NAME = re.compile(
    r"(?i)\b(?P<label>(?:patient|pt\.?)(?:'s)?\s*name|name|patient|pt\.?)(?P<sep>\s*[:=]\s*)"
    r"(?P<value>[^\W\d_][\w'\-]*(?:[ ,^.]+[^\W\d_][\w'\-]*){0,2})")
_PN = re.compile(r"[^\W\d_][\w'\-]*(?:\^+[\w'\-]*)+|\^+[^\W\d_][\w'\-]*")  # Doe^John, Doe^John^^^
_DATE_YMD = re.compile(r"(?<!\d)(?:1[89]|20)\d\d(?:(?P<s>[\-./_ ])(?:0?[1-9]|1[0-2])(?P=s)(?:0?[1-9]|[12]\d|3[01])"
                       r"|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?!\d)")
_DATE_DMY = re.compile(r"(?<![\d.])(\d{1,2})(?P<s>[\-./])(\d{1,2})(?P=s)(\d{4}|\d{2})(?![\d]|\.\d)")
_DATE_WORDS = re.compile(rf"(?i)(?<!\d)\d{{1,2}}(?:st|nd|rd|th)?[\s\-.,/]*{_MONTH}[\s\-.,/]*\d{{2,4}}(?!\d)|"
                         rf"{_LB}{_MONTH}[\s\-.,/]*\d{{1,2}}(?:st|nd|rd|th)?,?[\s\-./]*\d{{4}}(?!\d)")
_TOKEN = re.compile(r"[^\W_]+")
_DASHED_DIGITS = re.compile(r"(?<![\w.])\d+(?:[\-\s]\d+)+(?![\w.])")
_HASH = re.compile(r"[0-9a-f]{12,64}")


def _dmy(match: re.Match) -> str:
    a, b = int(match.group(1)), int(match.group(3))
    if 1 <= a <= 31 and 1 <= b <= 31 and (a <= 12 or b <= 12):
        return REDACTED
    return match.group(0)


def _token(match: re.Match, keep_hashes: bool) -> str:
    token = match.group(0)
    if not re.search(rf"\d{{{MIN_GENERIC_DIGITS},}}", token):
        return token
    if keep_hashes and _HASH.fullmatch(token) and not token.isdigit():
        return token  # a keyed hash of ours (volume, case, input ids), not an identifier
    return REDACTED


def _dashed(match: re.Match) -> str:
    text = match.group(0)
    return REDACTED if sum(c.isdigit() for c in text) >= MIN_GENERIC_DIGITS + 1 and "-" in text else text


def generic_scrub(text: str, keep_hashes: bool = True) -> str:
    """Remove from free text what looks like an identifier though no patient's is known:
    labelled values (``MRN: 123``, ``DOB 1970-01-02``, ``Name: John Doe``), DICOM person
    names (``Doe^John``), dates in the common formats, runs of 6+ digits (and the word they
    are part of, e.g. ``MRN4455667``) and dashed digit groups (``123-45-6789``).
    ``keep_hashes`` keeps lowercase hex words of 12+ characters (our own pseudonymous ids)."""
    if not text:
        return text
    text = _LABELLED_ID.sub(lambda m: m.group("label") + m.group("sep") + REDACTED, text)
    text = _LABELLED_NAME.sub(lambda m: m.group("label") + m.group("sep") + REDACTED, text)
    text = _PN.sub(REDACTED, text)
    text = _DATE_WORDS.sub(REDACTED, text)
    text = _DATE_YMD.sub(REDACTED, text)
    text = _DATE_DMY.sub(_dmy, text)
    text = _DASHED_DIGITS.sub(_dashed, text)
    return _TOKEN.sub(lambda m: _token(m, keep_hashes), text)
