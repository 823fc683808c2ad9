"""The distillation training loop (:class:`Trainer`), checkpoints, logs and evaluation.

``Trainer`` and friends are imported on first use, so that ``ssld.train.evaluate`` (``ssld
eval``) and ``ssld.train.checkpoint`` load without the training loop's imports (the kernels).
"""

__all__ = ["Trainer", "lr_factor", "param_groups"]


def __getattr__(name: str):
    if name in __all__:
        from ssld.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ssld.train' has no attribute {name!r}")
