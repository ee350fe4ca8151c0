"""The machinery behind :func:`vtprune.prune`: the handle and its hooks (the input stage before the LLM, the decoder
stages inside it), the per-forward state, and selection around a strategy. Not public API: import from ``vtprune``."""
