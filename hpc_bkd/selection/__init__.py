"""Choosing each block's student: which trained option (or the teacher's own block) it keeps.

* ``options``: building every block's options (trained units, int8 variants), scoring and timing
  them, and the choice (``Choice``) the job assembles.
* ``solver``: the exact choice under limits (HiGHS MILP) and the Pareto front; torch-free.
* ``rules``: the paper's acceptance rule (``select.method: tolerance``); torch-free.
"""
