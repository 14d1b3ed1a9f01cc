"""The public, stable surface of the package: FastCLIP's losses for any training loop (README, "Use
FastCLIP's loss in your own training code"). Semantic versioning covers what `fastclip.__all__` names."""

from .losses import ContrastiveLoss, FastCLIPLoss, OpenCLIPLoss, SigLIPLoss, create_loss

__all__ = ["ContrastiveLoss", "FastCLIPLoss", "OpenCLIPLoss", "SigLIPLoss", "create_loss"]
