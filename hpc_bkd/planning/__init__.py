"""The cost model and the planner: which rank (or team of ranks) trains which unit, and what the
schedule costs. Torch-free and MPI-free, so a plan can be made and checked anywhere.

* ``planner``: per-unit costs (``BlockCost``), teams and their overhead (``TeamModel``), the exact
  and heuristic assignment (``make_plan``), the plan record (``Plan``), ``costs.json``'s reader.
* ``schedule``: the order a rank steps its units in, and the makespan that order predicts.
* ``inputs``: what feeding the teacher its input costs (``InputCosts``), as the planner adds it.
"""
