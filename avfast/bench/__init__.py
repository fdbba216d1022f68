"""Benchmarks of avfast ops against their plain-PyTorch peers.

``avfast.bench.common``: cases, timing, memory, result rows, JSON/Markdown/PNG writers.
``avfast.bench.<op>``: one module per op, ``run(...)`` and ``main(argv)`` (the ``avfast
bench`` CLI and ``benchmarks/bench_<op>.py`` delegate to it).
"""
