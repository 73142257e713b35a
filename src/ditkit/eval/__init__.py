"""Sample evaluation.

- ``ditkit.eval.scoring``: ``ditkit eval``, which picks the scorer that fits the samples.
- ``ditkit.eval.evaluate``: the DiT paper's metrics (ADM's suite: FID, sFID, Inception Score,
  precision, recall) on the ported FID InceptionV3 (``ditkit.eval.inception``).
- ``ditkit.eval.metrics``: the formulas, on feature arrays.
- ``ditkit.eval.batches``: ADM's .npz sample and reference batches, folders of images.
- ``ditkit.eval.digits``: the digits demo's own metrics.
"""
