"""Teachers, their blocks, and the student blocks that replace them.

* ``models``: teacher architectures (CIFAR-style VGG/ResNet, torchvision, timm).
* ``surgery``: finding a model's replaceable blocks (``conv`` or ``unit`` granularity), taps on
  their activations, swapping and assembling, MACs.
* ``candidates``: the candidate kinds (one registry, ``register_kind``; torch-free) and the units
  of distillation work they make.
* ``students``: building any kind's student block (the built-in builders), its loss.
* ``whole_units``: whole-unit students (``skip``, ``shrink``) via Torch-Pruning.
"""
