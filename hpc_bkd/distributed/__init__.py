"""One rank among many: MPI, devices, threads, logging, stop signals, and losing a peer.

* ``runtime``: the rank's world (``Runtime``), stop requests, aborting every rank.
* ``peers``: the heartbeat that names a lost rank instead of hanging in a collective.
* ``netaddr``: the addresses nodes reach each other on.
* ``energy``: GPU energy (NVML), where there is a GPU.
"""
