"""Text decoding: UTF-8 first (a BOM is stripped; a UTF-16/32 BOM is honoured), else the
dataset's one legacy encoding, else latin-1, the last resort (fusebench.texts, the rule both
stages share).

`decode_text` never raises. `detect_legacy_encoding` picks the one legacy encoding of all a
dataset's non-UTF-8 texts at once; `check_encoding_name` checks a user's `--text-encoding`.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence

from fusebench.texts import decode_text

# Candidates for a dataset's legacy text encoding, in order of preference (ties keep it).
# The East Asian multi-byte codecs come first: many byte strings are invalid in them, so
# decoding every file strictly is strong evidence (GB18030 is what lab5 was re-saved in).
# Then the two Windows code pages most exports use, Western before Cyrillic; they decode
# almost any bytes, so they win where the multi-byte ones fail, or where charset-normalizer
# finds their text the least messy. Other code pages (cp1250, cp1253-cp1257) are left out on
# purpose: on short texts charset-normalizer rates them as clean as cp1252 (French read as
# cp1257 scores better than the truth), so offering them would mis-read Western data. A
# dataset in one of them says so with --text-encoding.
LEGACY_ENCODINGS: tuple[str, ...] = ("gb18030", "big5", "shift_jis", "euc-kr", "cp1252", "cp1251")
_UNICODE = ("utf-8", "utf-16", "utf-32")  # what a text file can be besides its legacy encoding


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _non_ascii_lines(raws: Sequence[bytes], limit: int) -> list[bytes]:
    """The lines holding non-ASCII bytes, thinned evenly to about `limit` bytes in all.
    Splitting at b"\\n" is safe: no candidate uses 0x0A inside a multi-byte character."""
    lines = [line for raw in raws for line in raw.split(b"\n") if not line.isascii()]
    total = sum(len(line) + 1 for line in lines)
    return lines[:: max(1, math.ceil(total / limit))]


def detect_legacy_encoding(raws: Sequence[bytes]) -> str | None:
    """The one legacy encoding of a dataset's non-UTF-8 texts `raws` (None when there are none).

    Each candidate of LEGACY_ENCODINGS is judged by the text it would give, as `decode_text`
    gives it: the non-ASCII lines decoded strictly by the candidate, or as latin-1 where it
    cannot. The text charset-normalizer finds least messy wins; ties go to the candidate that
    decodes more files strictly, then to the earlier one. "Decodes every file strictly" alone
    cannot settle it: cp1251 decodes almost any bytes, so one damaged file would otherwise
    hand a GB18030 dataset to cp1251 and garble every other text.
    """
    if not raws:
        return None
    from charset_normalizer.md import mess_ratio

    fails = {e: sum(not _decodes(raw, e) for raw in raws) for e in LEGACY_ENCODINGS}
    lines = _non_ascii_lines(raws, limit=1 << 16)

    def score(encoding: str) -> tuple[float, int, int]:
        text = "\n".join(decode_text(line, encoding)[0] for line in lines)
        mess = mess_ratio(text, maximum_threshold=1.0)
        return round(mess, 2), fails[encoding], LEGACY_ENCODINGS.index(encoding)

    return min(LEGACY_ENCODINGS, key=score)


def check_encoding_name(name: str) -> str:
    """Python's name for a text encoding given by a user; ValueError naming the fix if unknown."""
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        raise ValueError(
            f"unknown text encoding {name!r}; pass a Python codec name such as "
            f"{', '.join(LEGACY_ENCODINGS[:5])}"
        ) from None
