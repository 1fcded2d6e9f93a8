"""The command line: ``hpc-bkd`` / ``python -m hpc_bkd``.

* ``main``: the commands and how each ends (exit codes in ``hpc_bkd.errors``).
* ``args``: the job-selecting options every entry point shares.
"""
