"""Deduplication: exact (normalized text, optionally URL) and MinHash LSH near-duplicates.

Modules: ``normalize`` (text normalization, word hashing), ``minhash`` (shingles, datasketch-
compatible signatures, LSH band keys), ``clusters`` (bucketing, union-find, verification, keep
rule), ``index`` (persistent index for incremental runs), ``stage`` (the ``minhash``, ``lsh_bands`` and
``dedup`` stages, :class:`~refinery.tasks.dedup.stage.DedupConfig`, :func:`~refinery.tasks.dedup.stage.dedup_stages`).
Importing this package is cheap: numpy, pyarrow, numba and datasketch load on first use.
"""
