"""Benchmark scripts of aoti_rt (not tests): each compares variants side by side in one run.

Run one with ``python bench/bench_load.py --device cuda --size full`` (see ``--help``), or
all of them plus the charts with ``python bench/run_all.py``.
"""
