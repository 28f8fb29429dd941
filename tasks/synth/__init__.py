"""Synthetic data from curated documents: the ``synth`` stage (:mod:`.stage`), its fixed prompts
(:mod:`.prompts`) and its generators, a local model or an OpenAI-compatible endpoint
(:mod:`.generators`)."""
