"""Evaluation on one process: zero-shot classification on an image folder and image-text retrieval.

The caller runs this on rank 0 only, so nothing here touches torch.distributed. Metric names are
open_clip_train's, so results.jsonl files of both frameworks can be compared line by line.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from fastclip.optim import unwrap
from fastclip.precision import Precision, resolve_precision

Template = Callable[[str], str]

_SYNSET = re.compile(r"n\d{8}")
RECALL_AT = (1, 5, 10)


def is_imagenet_folder(classes: Sequence[str]) -> bool:
    """True when the class folders are the 1000 ImageNet synsets, whose sorted order is the class order."""
    return len(set(classes)) == len(open_clip.IMAGENET_CLASSNAMES) and all(_SYNSET.fullmatch(c) for c in classes)


def class_prompts(
    classes: Sequence[str], classnames_file: str | Path | None = None
) -> tuple[list[str], Sequence[Template]]:
    """Class names and prompt templates for a folder's (sorted) class directories.

    A `classnames_file` (one name per line, in sorted-folder order) wins; an ImageNet folder gets
    open_clip's ImageNet names and the 80 OpenAI templates; any other folder its directory names,
    underscores read as spaces. Non-ImageNet folders use the short generic template list.
    """
    imagenet = is_imagenet_folder(classes)
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES if imagenet else open_clip.SIMPLE_IMAGENET_TEMPLATES
    if classnames_file is not None:
        return _read_classnames(Path(classnames_file), len(classes)), templates
    if imagenet:
        return list(open_clip.IMAGENET_CLASSNAMES), templates
    return [c.replace("_", " ") for c in classes], templates


def _read_classnames(path: Path, expected: int) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != expected:
        raise ValueError(f"{path} lists {len(names)} class names but the image folder has {expected} classes")
    return names


def load_image_folder(folder: str | Path, transform: Callable) -> ImageFolder:
    """An ImageFolder that keeps empty class directories, so a partial copy keeps its class indices."""
    dataset = ImageFolder(str(folder), transform=transform, allow_empty=True)
    if len(dataset) == 0:
        raise ValueError(f"no images found under {folder}")
    return dataset


def zero_shot_eval(
    model: torch.nn.Module,
    folder: str | Path,
    preprocess: Callable,
    tokenizer: Callable,
    device: torch.device | str = "cpu",
    *,
    classnames_file: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    precision: Precision | str = "fp32",
) -> dict[str, float | int]:
    """Top-1/top-5 zero-shot accuracy on an ImageFolder, under open_clip_train's `imagenet-zeroshot-val-*`
    names whatever the folder holds (top-5 means top-min(5, classes))."""
    model, device = unwrap(model), torch.device(device)
    precision = _resolve(precision, device)
    dataset = load_image_folder(folder, preprocess)
    classnames, templates = class_prompts(dataset.classes, classnames_file)
    k = min(5, len(classnames))
    with _eval_mode(model):
        with precision.autocast(device):
            classifier = open_clip.build_zero_shot_classifier(
                model, tokenizer=tokenizer, classnames=classnames, templates=templates, device=device
            )
        loader = _loader(dataset, batch_size, workers, device)
        top1, topk = _count_correct(model, classifier.float(), loader, k, device, precision)
    return {
        "imagenet-zeroshot-val-top1": top1 / len(dataset),
        "imagenet-zeroshot-val-top5": topk / len(dataset),
        "zeroshot-num-classes": len(classnames),
        "zeroshot-num-images": len(dataset),
    }


def _count_correct(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    loader: Iterable,
    k: int,
    device: torch.device,
    precision: Precision,
) -> tuple[int, int]:
    input_dtype = open_clip.get_input_dtype(precision.model_dtype)
    top1 = topk = 0
    with torch.inference_mode():
        for images, targets in loader:
            images = images.to(device=device, dtype=input_dtype, non_blocking=True)
            with precision.autocast(device):
                features = model.encode_image(images, normalize=True)
            predictions = (features.float() @ classifier).topk(k, dim=1).indices.cpu()
            hits = predictions == targets.view(-1, 1)
            top1 += int(hits[:, 0].sum())
            topk += int(hits.any(dim=1).sum())
    return top1, topk


def retrieval_eval(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    *,
    precision: Precision | str = "fp32",
) -> dict[str, float | int]:
    """Image<->text recall@1/5/10 and ranks over the whole validation set, plus the CLIP loss averaged
    over its batches (in-batch negatives, the model's logit_scale); pair i's match is position i."""
    model, device = unwrap(model), torch.device(device)
    precision = _resolve(precision, device)
    with _eval_mode(model):
        image_features, text_features, loss = _embed_pairs(model, loader, device, precision)
    metrics: dict[str, float | int] = {}
    metrics.update(rank_metrics("image_to_text", ground_truth_ranks(image_features, text_features)))
    metrics.update(rank_metrics("text_to_image", ground_truth_ranks(text_features, image_features)))
    metrics["clip_val_loss"] = loss
    metrics["num_samples"] = len(image_features)
    return metrics


def _embed_pairs(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device,
    precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Normalised float32 features of every pair, kept on the CPU, and the sample-weighted mean loss."""
    input_dtype = open_clip.get_input_dtype(precision.model_dtype)
    images_out, texts_out, loss_sum = [], [], 0.0
    with torch.inference_mode():
        for batch in loader:
            images = batch["image"].to(device=device, dtype=input_dtype, non_blocking=True)
            texts = batch["text"].to(device=device, non_blocking=True)
            with precision.autocast(device):
                image_features = model.encode_image(images, normalize=True).float()
                text_features = model.encode_text(texts, normalize=True).float()
            loss_sum += clip_loss(image_features, text_features, model.logit_scale.exp().float()) * len(images)
            images_out.append(image_features.cpu())
            texts_out.append(text_features.cpu())
    if not images_out:
        raise ValueError("the validation loader yielded no batches")
    image_features, text_features = torch.cat(images_out), torch.cat(texts_out)
    return image_features, text_features, loss_sum / len(image_features)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> float:
    """Symmetric cross-entropy of one batch with in-batch negatives (open_clip's ClipLoss on one rank)."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)


def ground_truth_ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of key i among all keys for query i, by cosine score, in row chunks so memory stays
    O(chunk * n). Ties count against the match, so a collapsed model scores no recall."""
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.T
        rows = torch.arange(len(scores))
        matched = scores[rows, rows + start].unsqueeze(1)
        ranks.append((scores >= matched).sum(dim=1) - 1)
    return torch.cat(ranks)


def rank_metrics(name: str, ranks: torch.Tensor) -> dict[str, float]:
    """open_clip_train's retrieval metrics from 0-based ranks: 1-based mean and median rank, R@k."""
    ranks = ranks.float()
    metrics = {
        f"{name}_mean_rank": float(ranks.mean()) + 1,
        f"{name}_median_rank": math.floor(float(ranks.quantile(0.5))) + 1,
    }
    metrics.update({f"{name}_R@{k}": float((ranks < k).float().mean()) for k in RECALL_AT})
    return metrics


def append_results(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append `record` as one JSON line (results.jsonl), creating the directory on first use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(dict(record)) + "\n")


def _resolve(precision: Precision | str, device: torch.device) -> Precision:
    return resolve_precision(precision, device) if isinstance(precision, str) else precision


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then the caller's mode back (training resumes where it was)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _loader(dataset: ImageFolder, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, shuffle=False, pin_memory=device.type == "cuda"
    )
