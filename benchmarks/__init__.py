"""Timing and quality benchmarks: scripts that print tables (never timed tests).

Each ``benchmarks/bench_<topic>.py`` has a ``main(argv=None)``;
``python -m benchmarks`` runs them all, ``python -m benchmarks <topic>`` one.
"""
