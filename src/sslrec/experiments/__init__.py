"""Experiments: sweeps (``launch/sweep.py``) and benchmarks (``launch/bench.py``).

    plan.py     sweep planning: grid parsing and validation, spec files, run names and
                overrides, the cartesian product; where a run lives and whether it finished
    execute.py  running the planned runs as subprocesses (parallel, resume, progress, failures);
                ``run_command``, the whole sweep command
    report.py   results.csv / summary.csv / results.md (mean ± std, paired differences)
    plots.py    the figures (matplotlib, an optional extra, imported only when drawing)
    bench.py    the benchmark suite; ``run_command``, the whole benchmark command

Imports go one way: plan <- report <- plots, and execute -> plan, report, plots (bench is apart).
"""
