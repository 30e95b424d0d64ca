"""Benchmarks and the reproduction: run from the project root as `python -m tools.<name>`
(selfflow installed)."""
