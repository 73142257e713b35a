"""Speed for ditkit's DiT, applied from outside through one door (``ditkit.fast.recipes``).

The reference network (``ditkit.models``), the objectives and the samplers never import this
package.  Its modules swap into a model keeping the state dict (``fused_*``, ``tuned_linear``,
``fp8*``, ``blocks``), over the kernels of ``ditkit.kernels``.
"""
from ditkit.fast.recipes import (
    SAMPLE_RECIPES,
    SPEEDS,
    TRAIN_RECIPES,
    SampleSpeed,
    TrainPlan,
    TrainRun,
    TrainSpeed,
    describe,
    sample_speed,
    train_speed,
)

__all__ = ["SAMPLE_RECIPES", "SPEEDS", "TRAIN_RECIPES", "SampleSpeed", "TrainPlan", "TrainRun", "TrainSpeed",
           "describe", "sample_speed", "train_speed"]
