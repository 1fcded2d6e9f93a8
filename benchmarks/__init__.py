"""Tools that measure hpc_bkd, kept outside the library's import path.

Run them from the repository root:

* ``python -m benchmarks.bench``: PBKD on 1 and N ranks, the paper's sequential schedule and the
  end-to-end KD baseline, in one table with ``bench.json`` and plots (``make bench``);
* ``python -m benchmarks.baseline``: the end-to-end KD baseline alone.

They read a job's ``report.json`` only through ``hpc_bkd.store.records.JobRecord``.
"""
