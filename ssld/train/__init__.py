"""The distillation training loop (:class:`Trainer`), checkpoints and logs."""

from ssld.train.trainer import Trainer, lr_factor, param_groups

__all__ = ["Trainer", "lr_factor", "param_groups"]
