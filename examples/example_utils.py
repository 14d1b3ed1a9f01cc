"""What the examples share that is not about the loss: Fashion-MNIST pairs, a zero-shot check, torchrun.

Fashion-MNIST comes from the Debian package dataset-fashion-mnist when installed, else it is downloaded
once (fastclip.datasets.demo). The model is open_clip's, in a CPU-sized configuration the project
registers (ViT-Tiny-32px); in your code, your own dataset and model take their place.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a clone without `pip install -e .` runs them too

import open_clip  # noqa: E402

from fastclip import SigLIPLoss  # noqa: E402
from fastclip.datasets.demo import CLASS_NAMES, FILES, caption, find_fashion_mnist, read_idx  # noqa: E402
from fastclip.models import register_model_configs  # noqa: E402

MODEL = "ViT-Tiny-32px"  # 28-64 px images, 2+2 layers of width 64: a CPU trains it in seconds

DATA = ROOT / "data" / "examples"  # shards built by the DDP example (git-ignored)
OUT = ROOT / "logs" / "examples"  # checkpoints and per-step losses (git-ignored)


def tiny_model(loss: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """open_clip's model (returning a dict), its training and evaluation transforms and its tokenizer;
    SigLIP's model gets its temperature and logit bias at creation."""
    register_model_configs()
    kwargs = SigLIPLoss.MODEL_KWARGS if loss == "siglip" else {}
    model, train_transform, eval_transform = open_clip.create_model_and_transforms(MODEL, device=device,
                                                                                   output_dict=True, **kwargs)
    return model, train_transform, eval_transform, open_clip.get_tokenizer(MODEL)


def fashion_arrays(split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` images (28x28 uint8) and labels of Fashion-MNIST's 'train' or 'test' split."""
    directory = find_fashion_mnist()
    images, labels = FILES[split]
    return read_idx(directory / images)[:limit], read_idx(directory / labels)[:limit]


class FashionPairs(Dataset):
    """Image-caption pairs; item i is (image, caption tokens, i). The third value is what FastCLIP's loss
    calls `index`: the pair's position in the data set, the same in every epoch and on every rank."""

    def __init__(self, pairs: int, preprocess: Callable, tokenizer: Callable, seed: int = 0) -> None:
        self.images, labels = fashion_arrays("train", pairs)
        rng = np.random.default_rng(seed)
        self.tokens = tokenizer([caption(int(label), rng) for label in labels])
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.preprocess(Image.fromarray(self.images[i])), self.tokens[i], i


@torch.no_grad()
def zero_shot_top1(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, images: int = 1000) -> float:
    """Zero-shot top-1 accuracy on the first `images` test images, one prompt per class (chance: 0.1)."""
    pixels, labels = fashion_arrays("test", images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    classes = F.normalize(model.encode_text(tokenizer([f"a photo of a {name}." for name in CLASS_NAMES]).to(device)),
                          dim=-1)
    batch = torch.stack([preprocess(Image.fromarray(image)) for image in pixels]).to(device)
    predicted = (F.normalize(model.encode_image(batch), dim=-1) @ classes.T).argmax(dim=-1)
    model.train(was_training)
    return float((predicted.cpu() == torch.from_numpy(labels.astype(np.int64))).float().mean())


def under_launcher() -> bool:
    """True in a process that torchrun (or accelerate launch) started."""
    return "LOCAL_RANK" in os.environ


def relaunch_with_torchrun(script: str, nproc: int, argv: list[str]) -> None:
    """`torchrun --standalone --nproc_per_node=N script argv...` from this process (python script.py works)."""
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", f"--nproc_per_node={nproc}", script, *argv])
