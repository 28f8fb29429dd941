"""Demo data: a small deterministic crawl with planted problems, and instruction/preference data.

- :func:`refinery.tasks.demo.crawl.make_demo_crawl` writes real WARC files plus ``ground_truth.json``.
- :func:`refinery.tasks.demo.instructions.make_instructions` / :func:`~refinery.tasks.demo.instructions.make_preferences`
  turn curated documents into Alpaca JSON and HH-RLHF JSONL for the finetune and align stages.

Light to import: only the standard library (fastwarc/resiliparse are needed by the tests, not here).
"""
