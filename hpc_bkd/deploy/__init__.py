"""The student as it ships: deploy form, timing, and files that load without hpc_bkd.

* ``form``: the deploy form (eval, BatchNorm folded), inference timing, model sizes.
* ``runtimes``: the runtimes selection times options in (PyTorch eager, ONNX Runtime; int8).
* ``export``: ``.pt2`` and ONNX files, ``model.json``, ``load_student``.
"""
