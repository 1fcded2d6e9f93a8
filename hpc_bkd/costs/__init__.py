"""Measuring what the planner needs: each unit's step time on this rank's device, and the input
feed (``costs.json``). The model those figures feed is ``planning``.

* ``measure``: timing every unit's teacher and student steps, per rank; the cost table.
* ``inputs``: timing the input feed (decoding, copying, exchanging batches).
"""
