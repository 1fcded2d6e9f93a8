"""Images in, batches out.

* ``sources``: one ``DataSource`` per ``data.dataset`` (digits, CIFAR, ImageFolder; a new one is a
  ``register_source``), ``load_data``.
* ``batches``: splits in memory, the job's ``Data``, batches addressed by (epoch, step).
* ``streaming``: ImageFolders read from disk by DataLoader workers; ``decode``: decoding and
  resizing one image; ``listing``: listing a folder safely (no loops, no file twice).
"""
