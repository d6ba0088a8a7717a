"""The chaos benchmark (issue 13): seeded faults against tiny real runs, each compared bitwise with an
uninterrupted reference run of the same config.

    python -m bench.chaos --faults 100 --seed 13 --executor slurm     # the table in docs/reliability.md
    python -m bench.chaos --faults 12 --seed 1 --kinds 1,5            # a quick screen of two kinds
    python -m bench.chaos --kinds 5 --fault-seed 123456               # replay one fault of a table's row

Layout: config.py (the tiny job and which of its keys change the numbers), workspace.py (one folder, registry
and set of processes per fault; orch commands; waiting on real state), watch.py (the logs' events and the
process table while a fault runs), census.py (what a finished fault is measured by), reference.py (the cached
uninterrupted runs), kinds/ (the 13 kinds of faults: how each is drawn and run), run.py (draw, run, tabulate).
tests/test_chaos.py runs one fault of each kind through the same functions.
"""
