"""The one text decoding rule of both stages: UTF-8 first (a BOM is stripped; a UTF-16/32 BOM
is honoured), else the dataset's one legacy encoding (recorded in its caches as
`text_encoding`), else latin-1, the last resort. Extraction decodes a dataset's texts with
it; the report decodes them again with it to show them. `decode_text` never raises.
"""

from __future__ import annotations

import codecs

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def decode_unicode(raw: bytes) -> tuple[str, str] | None:
    """UTF-8 (BOM stripped), or UTF-16/32 when the file starts with their BOM; else None."""
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding), encoding
            except UnicodeDecodeError:
                return None
    return None


def decode_text(raw: bytes, legacy: str | None = None) -> tuple[str, str]:
    """(text, the encoding that decoded it): UTF-8 (BOM stripped; a UTF-16/32 BOM is
    honoured), else strictly the `legacy` encoding, else latin-1 (every byte is a character).
    Never raises: a legacy name Python does not know falls through to latin-1."""
    unicode = decode_unicode(raw)
    if unicode is not None:
        return unicode
    if legacy:
        try:
            return raw.decode(legacy), legacy
        except (UnicodeDecodeError, LookupError):
            pass
    return raw.decode("latin-1"), "latin-1"
