"""The run directory and what is written in it: where every file lives, how it is written
(atomically, refusing a full disk) and read back (verified), and what the report holds.

* ``rundir``: every path of a run directory, resume rules, which job owns it.
* ``atomic_io``: atomic writes and safe loads (``DamagedFile``, ``DiskFull``).
* ``records``: the job record, the one report schema (``report.json``).
* ``lock``: the job lock that refuses a second job on one directory.
* ``progress``: each rank's progress file (``hpc-bkd status``).
"""
