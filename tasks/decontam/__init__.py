"""Benchmark decontamination: n-gram overlap of documents with benchmark texts."""
