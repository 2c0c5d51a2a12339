"""Benchmarks and soaks, apart from the test run: each a module run from the repository's root,
`python -m bench.throughput` and so on (docs/benchmarks.md). They share tests/support with the tests."""
