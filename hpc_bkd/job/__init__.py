"""A job end to end: the stages in order, their records, and what a person reads of it.

* ``stages``: the stages of a job, one collective each (``run_job``, ``run_rank``, ``plan_only``).
* ``outcomes``: the records the stages hand each other.
* ``report``: the job record, ``summary.txt`` and the plots; ``plots``: the schedule picture.
* ``status``: ``hpc-bkd status``; ``tracking``: TensorBoard / MLflow backends.
* ``limits``: the up-front memory estimate; ``databench``: ``hpc-bkd data-bench``.
"""
