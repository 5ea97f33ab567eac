"""The fuzz suite: real files (../shared/data, pydicom's test files, crossdiff's own configs and bundled
model) mutated thousands of ways and fed to the public readers and config loaders, each input in an
isolated worker process with a memory and time limit, every outcome classified.

    PYTHONPATH=tests python -m fuzz --inputs 10000 --out benchmarks/results   # the long run (benchmarks/fuzz.py)

tests/test_fuzz.py runs a short slice of the same campaign in CI.
"""
