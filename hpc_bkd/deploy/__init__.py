"""The student as it ships: deploy form, timing, and files that load without hpc_bkd.

* ``form``: the deploy form (eval, BatchNorm folded), inference timing, model sizes.
* ``formats``: writing and opening ``.pt2`` and ONNX files (the one place that does).
* ``runtimes``: the runtimes selection times options in (PyTorch eager, ONNX Runtime; int8).
* ``export``: ``.pt2`` and ONNX files, ``model.json``, ``load_student``.
"""
