"""Training: ``train(cfg, resume)`` runs a config to a stop condition (``pipeline/train.py`` is its command line).

One job per module: ``loop`` (``train`` and ``train_step``), ``start`` (what a start settles before its first
step), ``batches`` (data order, micro-batches, each step's random draws), ``resume`` (what a checkpoint accepts and
how a start continues from it), ``monitoring`` (logs, the divergence guard, stopping, exit status), ``hooks``
(checkpoint, export, sample grid, evaluation) and ``state`` (``TrainingState``, the run's live objects). The
checkpoint files are ``pipeline.checkpointing``'s, the U-Net's construction ``pipeline.models.build``'s.
"""

from pipeline.training.loop import train

__all__ = ["train"]
