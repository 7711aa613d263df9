"""Laptop and demo helpers: the embedded broker, synthetic streams, `up`, `produce` and `status`.

Only the CLI (the entry point), the tests and the benchmarks import this package; train/ and
serve/ never do, so a production trainer or server runs without any of it.
"""
