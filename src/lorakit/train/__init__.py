"""Training: lorakit's trainer, data formats, the methods' training hooks, checkpoints and multi-process helpers.

Submodules are imported on use (``from lorakit.train.trainer import Trainer``) so ``import lorakit`` stays light.
"""
