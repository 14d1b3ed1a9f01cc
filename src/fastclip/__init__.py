"""FastCLIP: CLIP training with global contrastive losses by compositional optimisation.

`from fastclip import FastCLIPLoss` (and OpenCLIPLoss, SigLIPLoss, create_loss, ContrastiveLoss): the
losses for a training loop of your own, the package's public API (fastclip.api). They load on first
use, so that the torch-free parts (the training script's flag parser) start without torch.
"""

from __future__ import annotations

__version__ = "1.0.0"
__all__ = ["ContrastiveLoss", "FastCLIPLoss", "OpenCLIPLoss", "SigLIPLoss", "create_loss"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")
