"""Training: the teacher, and each rank's students against it.

* ``distiller``: the per-rank distiller (every owned unit against the teacher's activations).
* ``teacher``: training or loading the teacher, checking it fits.
* ``teacher_cache``: the teacher's activations, cached where they fit.
* ``teams``: data-parallel teams of ranks and their transports.
* ``precision``: fp32 / bf16 / fp16 autocast; ``finetune``: acceptance and the KD fine-tuning.
"""
