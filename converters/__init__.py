"""PyTorch ConvNeXt checkpoints into converted folders, each proven equal to its source framework.

`plan` decides what a conversion does, `pipeline.run` runs it (fetch, read, map, write, parity); the
source framework runs in a child process of its own (`reference`, driven by `reference_process`).
Stands on `checkpoints` and `zoo.core`.
"""
