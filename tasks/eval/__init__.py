"""Evaluation: held-out bits per byte and perplexity, lm-evaluation-harness benchmarks, generation
samples (the ``evaluate`` stage and flow)."""
