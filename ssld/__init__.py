"""ssld: the SSLD distillation pipeline (dedup -> select -> train -> finetune -> eval).

Built on the public API of :mod:`ssld_kernels` only.
"""

__version__ = "0.1.0"
