"""FastCLIP: CLIP training with global contrastive losses by compositional optimisation."""

__version__ = "0.1.0"
