"""`make bench`: latency, capacity and end-to-end figures of pg-safe-backup on real PostgreSQL.

Not part of the test suite. See ``bench/run.py`` and the README's "Benchmarks" section.
"""
