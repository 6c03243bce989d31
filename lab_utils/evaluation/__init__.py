"""Benchmarks per family; each lives in its own module (``perplexity`` for
decoder-only models, siblings for the other families)."""
