"""Curate-time mixing: per-source token weights or targets, FineWeb-2-style rehydration by duplicate-cluster size."""
