"""What every filter rule shares: its config base (language handling), the rule interface, the registry.

A rule looks at one :class:`~refinery.tasks.filters.text.DocView` and either returns ``None`` (keep; it may
have rewritten ``doc.text``) or a :class:`Drop` with a short reason and the measured value that
crossed the threshold. Rules never re-split text themselves when the view already has it.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, ClassVar, Generic, Literal, NamedTuple, TypeVar

from pydantic import Field
from refinery.tasks.config import StrictModel

from refinery.tasks.filters.text import DocView


class Drop(NamedTuple):
    reason: str            # short, e.g. "short_doc"; the stage prefixes the rule name
    value: float | None    # the measured quantity that failed (ratio, count), None when not numeric


class RuleConfig(StrictModel):
    """Language handling common to all rules."""

    languages: list[str] | None = Field(
        default=None, description="languages (ISO 639-1 codes, as in the `lang` column) this rule applies to; "
                                  "null = every language")
    other_languages: Literal["skip", "drop", "table"] = Field(
        default="skip", description="what documents in other languages get: 'skip' = pass this rule untouched, "
                                    "'drop' = dropped with reason 'unsupported_language', 'table' = this rule "
                                    "with the language's thresholds from the language table (FineWeb-2), or "
                                    "its script's fallback (filters/languages.py)")


C = TypeVar("C", bound=RuleConfig)


class Rule(Generic[C]):
    """Base class: subclasses set ``name``/``config_cls`` and implement :meth:`check`; ``Rule[XConfig]``
    types ``self.cfg`` as the rule's own config."""
    name: ClassVar[str]
    config_cls: ClassVar[type[RuleConfig]]

    def __init__(self, cfg: C):
        self.cfg: C = cfg
        self.stats: Counter = Counter()   # per-rule side counts (lines removed, spans redacted, ...)

    def applies(self, lang: str | None) -> bool:
        langs = self.cfg.languages
        return langs is None or lang in langs

    def check(self, doc: DocView) -> Drop | None:  # pragma: no cover - interface
        raise NotImplementedError

    def table_overrides(self, profile) -> dict | None:
        """Config fields to replace for a language checked by the language table
        (:class:`~refinery.tasks.filters.languages.LanguageProfile`); None = the rule cannot use the table
        for it (the document skips the rule, counted)."""
        return None

    def for_profile(self, profile) -> "Rule | None":
        """This rule with the thresholds of ``profile`` (cached; shares this rule's stats counter)."""
        cache = self.__dict__.setdefault("_by_profile", {})
        key = (profile.lang, profile.kind)
        if key not in cache:
            upd = self.table_overrides(profile)
            if upd is None:
                cache[key] = None
            else:
                clone = type(self)(self.cfg.model_copy(update={**upd, "languages": None}))
                clone.stats = self.stats
                cache[key] = clone
        return cache[key]


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    RULES[cls.name] = cls
    return cls


def rule_names() -> list[str]:
    return sorted(RULES)


Checker = Callable[[DocView], Drop | None]
