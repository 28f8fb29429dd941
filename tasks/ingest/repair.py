"""Text repair at ingest: mojibake and broken escapes (ftfy), then an optional Unicode normal form.

ftfy (Speer 2019, "ftfy", Zenodo 10.5281/zenodo.2591652) undoes text that was encoded in one charset and
decoded in another ("fÃ¼r" -> "für"), HTML entities left in plain text, curly-quote and ligature
damage; it changes nothing in text that is already right. Imported on first use only.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache


@lru_cache(maxsize=1)
def _ftfy():
    from refinery.tasks.extras import require

    return require("ftfy", "ingest.repair_text=ftfy")


def repair_text(text: str, repair: str = "ftfy", unicode_form: str = "none") -> str:
    """``text`` repaired by ``repair`` ('ftfy' or 'off'), then normalised to ``unicode_form``
    ('NFC', 'NFKC' or 'none')."""
    if repair == "ftfy":
        # normalization=None: the normal form is our own, separate option
        text = _ftfy().fix_text(text, normalization=None)
    elif repair != "off":
        raise ValueError(f"unknown text repair {repair!r}; choose 'ftfy' or 'off'")
    if unicode_form in ("NFC", "NFKC"):
        text = unicodedata.normalize("NFC" if unicode_form == "NFC" else "NFKC", text)
    elif unicode_form != "none":
        raise ValueError(f"unknown Unicode form {unicode_form!r}; choose NFC, NFKC or none")
    return text
