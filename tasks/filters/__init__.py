"""Quality and content filters (Gopher, C4, FineWeb, URL blocklist, PII) as one configurable stage.

Light to import: pydantic, regex, numpy; no model downloads. Public API::

    from refinery.tasks.filters import Filter, FilterConfig, FilterChain, filter_table, table_rows
    ds = Filter.run(store, [docs_ds], FilterConfig(rules=["url", "gopher_quality", "pii"]))
"""
from refinery.tasks.filters import c4, code, content, fineweb, gopher  # noqa: F401  (registers the rules)
from refinery.tasks.filters.base import RULES, Drop, Rule, RuleConfig, rule_names
from refinery.tasks.filters.stage import (DEFAULT_RULES, Filter, FilterChain, FilterConfig, filter_table, read_exclusions,
                                          run_filter, table_rows)
from refinery.tasks.filters.text import DocView, WordTokenizer

__all__ = ["Filter", "FilterConfig", "FilterChain", "filter_table", "table_rows", "run_filter", "read_exclusions",
           "DEFAULT_RULES", "RULES", "Rule", "RuleConfig", "Drop", "rule_names", "DocView", "WordTokenizer"]
