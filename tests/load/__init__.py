"""Load tests (locustfile.py) and the serving benchmark (bench.py, `make bench`); see docs/benchmark.md."""
