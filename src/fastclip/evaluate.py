"""Evaluation split over all ranks: zero-shot classification on an image folder, image-text retrieval.

Every rank embeds its share (zero-shot: a contiguous block of the class names and of the images;
retrieval: its validation loader's share of the pairs), the pieces are joined with collectives, and
every rank returns the same metrics, equal to those of one process. Without torch.distributed
initialised everything runs in this process. Progress bars show on rank 0 when stderr is a terminal,
so log files stay clean. Metric names are open_clip_train's, so results.jsonl files of both
frameworks can be compared line by line.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from fastclip.data.workers import worker_arguments
from fastclip.distributed import comm
from fastclip.train.optim import unwrap
from fastclip.train.precision import Precision, resolve_precision

Template = Callable[[str], str]
T = TypeVar("T")

_SYNSET = re.compile(r"n\d{8}")
RECALL_AT = (1, 5, 10)
# the fixed temperature of `global_val_loss_ref`: runs whose learnt temperatures differ compare on it
REFERENCE_TAU = 0.07


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


def rank_share(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous block of n items: sizes differ by at most one, no item twice or never."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


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
    names whatever the folder holds (top-5 means top-min(5, classes)).

    Each rank embeds a block of the class names (the classifier is all-gathered) and a block of the
    images (in folder order, no image twice); the correct counts are summed over ranks.
    """
    model, device = unwrap(model), torch.device(device)
    precision = _resolve(precision, device)
    dataset = load_image_folder(folder, preprocess)
    classnames, templates = class_prompts(dataset.classes, classnames_file)
    k = min(5, len(classnames))
    images = Subset(dataset, rank_share(len(dataset), comm.rank(), comm.world_size()))
    with _eval_mode(model):
        classifier = _zero_shot_classifier(model, tokenizer, classnames, templates, device, precision)
        loader = _loader(images, batch_size, workers, device)
        top1, topk = _count_correct(model, classifier, _progress(loader, "zero-shot"), k, device, precision)
    return {
        "imagenet-zeroshot-val-top1": top1 / len(dataset),
        "imagenet-zeroshot-val-top5": topk / len(dataset),
        "zeroshot-num-classes": len(classnames),
        "zeroshot-num-images": len(dataset),
    }


def _zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device,
    precision: Precision,
) -> torch.Tensor:
    """(embedding dim, classes) float32 class embeddings; this rank embeds its block of the classes."""
    block = rank_share(len(classnames), comm.rank(), comm.world_size())
    mine = torch.empty(0, 0, device=device)
    if len(block):
        with precision.autocast(device):
            mine = open_clip.build_zero_shot_classifier(
                model, tokenizer=tokenizer, classnames=classnames[block.start : block.stop], templates=templates,
                device=device, use_tqdm=_show_progress(),
            ).float().T
    return comm.gather_rows(mine).T


def _count_correct(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    loader: Iterable,
    k: int,
    device: torch.device,
    precision: Precision,
) -> tuple[int, int]:
    """Top-1 and top-k hits summed over all ranks; counted on the device, read once at the end."""
    input_dtype = open_clip.get_input_dtype(precision.model_dtype)
    with torch.inference_mode():
        counts = torch.zeros(2, dtype=torch.int64, device=device)
        for images, targets in loader:
            images = images.to(device=device, dtype=input_dtype, non_blocking=True)
            targets = targets.to(device=device, non_blocking=True)
            with precision.autocast(device):
                features = model.encode_image(images, normalize=True)
            hits = (features.float() @ classifier).topk(k, dim=1).indices == targets.view(-1, 1)
            counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        top1, topk = comm.all_reduce_sum(counts).tolist()
    return top1, topk


def retrieval_eval(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    *,
    batch_size: int,
    precision: Precision | str = "fp32",
    num_samples: int | None = None,
) -> dict[str, float | int]:
    """Image<->text recall@1/5/10 and ranks over the whole validation set, plus the CLIP loss (in-batch
    negatives, the model's logit_scale) averaged over consecutive blocks of `batch_size` pairs in set
    order, as one process reading the set in batches of that size sees them, and the global contrastive
    loss; pair i's match is pair i.

    With several captions per image (MS-COCO, Flickr30k), recall follows their protocol: image->text is a
    hit when any of the image's captions is in the top k of all captions, text->image counts every caption
    as a query of its image; the losses use each image's first caption.

    `loader` yields this rank's share of the set (`embed_set`); `num_samples` keeps the first pairs.
    The ranks split the query rows between them.
    """
    model = unwrap(model)
    embedded = embed_set(model, loader, device, precision=precision, num_samples=num_samples)
    image_features, text_features = embedded.images, embedded.texts
    with torch.inference_mode():
        metrics: dict[str, float | int] = {}
        metrics.update(rank_metrics("image_to_text", _split_ranks(image_to_text_ranks, image_features,
                                                                  embedded.captions, embedded.owner)))
        metrics.update(rank_metrics("text_to_image", _split_ranks(text_to_image_ranks, embedded.captions,
                                                                  image_features, embedded.owner)))
        logit_scale = model.logit_scale.exp().float()
        metrics["clip_val_loss"] = blockwise_clip_loss(image_features, text_features, logit_scale, batch_size)
        if len(image_features) > 1:
            metrics["global_val_loss"] = global_contrastive_loss(image_features, text_features, 1 / float(logit_scale))
            metrics["global_val_loss_ref"] = global_contrastive_loss(image_features, text_features, REFERENCE_TAU)
    metrics["num_samples"] = len(image_features)
    if len(embedded.captions) != len(image_features):
        metrics["num_captions"] = len(embedded.captions)
    return metrics


@dataclass(frozen=True)
class EmbeddedSet:
    """A validation set's normalised float32 features in set order: `images` and `texts` (each image's
    first caption) row by row, and every caption with the row of its image (`owner`)."""

    images: torch.Tensor
    texts: torch.Tensor
    captions: torch.Tensor
    owner: torch.Tensor


def embed_set(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    *,
    precision: Precision | str = "fp32",
    num_samples: int | None = None,
) -> EmbeddedSet:
    """Normalised float32 features of the whole set, on every rank, in set order.

    Each rank embeds what its loader yields, batches carrying each pair's place in the set as 'order'
    (`build_val_loader`'s); the features of all ranks are gathered and sorted by it, so the result does
    not depend on how the set was split. Every rank holds all N x D features on `device`: the recall
    computation needs them. With `num_samples`, the first pairs in set order: the orders are gathered
    first, and only the features of those pairs (a loader built with `limit` reads at most that many
    per worker slot). Batches with several captions per image ('captions', 'caption_owner') have each
    caption embedded; the others' only caption is the first.
    """
    model, device = unwrap(model), torch.device(device)
    precision = _resolve(precision, device)
    input_dtype = open_clip.get_input_dtype(precision.model_dtype)
    images_out, texts_out, orders, captions_out, caption_orders = [], [], [], [], []
    with _eval_mode(model), torch.inference_mode():
        for batch in _progress(loader, "retrieval"):
            images = batch["image"].to(device=device, dtype=input_dtype, non_blocking=True)
            texts = batch["text"].to(device=device, non_blocking=True)
            order = batch["order"].to(device=device, non_blocking=True)
            with precision.autocast(device):
                images_out.append(model.encode_image(images, normalize=True).float())
                texts_out.append(model.encode_text(texts, normalize=True).float())
                if "captions" in batch:
                    captions_out.append(model.encode_text(batch["captions"].to(device), normalize=True).float())
                    caption_orders.append(order[batch["caption_owner"].to(device)])
                else:
                    captions_out.append(texts_out[-1])
                    caption_orders.append(order)
            orders.append(order)
        local_order = _joined(orders, torch.empty(0, dtype=torch.int64, device=device))
        order = comm.gather_rows(local_order)
        if len(order) == 0:
            raise ValueError("the validation loader yielded no pairs on any rank")
        wanted = len(order) if num_samples is None else min(num_samples, len(order))
        cutoff = order.kthvalue(wanted).values  # orders are unique: the first `wanted` pairs are those <= it
        empty = torch.empty(0, 0, device=device)
        local = _joined([torch.cat(pair, dim=1) for pair in zip(images_out, texts_out)], empty)
        features = comm.gather_rows(local[local_order <= cutoff])  # only the kept rows travel
        kept = order[order <= cutoff].sort()
        features = features[kept.indices]
        width = features.shape[1] // 2
        captions, owner = _gathered_captions(captions_out, caption_orders, cutoff, kept.values, device)
    return EmbeddedSet(features[:, :width], features[:, width:], captions, owner)


def _gathered_captions(parts: list[torch.Tensor], part_orders: list[torch.Tensor], cutoff: torch.Tensor,
                       image_orders: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's captions of the kept images, sorted by their image's place in the set (stable: an image's
    captions keep their order), and the row of that image."""
    local = _joined(parts, torch.empty(0, 0, device=device))
    local_orders = _joined(part_orders, torch.empty(0, dtype=torch.int64, device=device))
    keep = local_orders <= cutoff
    captions = comm.gather_rows(local[keep])
    orders = comm.gather_rows(local_orders[keep])
    sorted_orders, by_image = orders.sort(stable=True)
    return captions[by_image], torch.searchsorted(image_orders, sorted_orders)


def _joined(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else empty


def _score_blocks(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, cosine scores of queries[start : start + chunk] against every key), a block at a time, so that
    memory stays O(chunk * keys) however large the set."""
    for start in range(0, len(queries), chunk):
        yield start, queries[start : start + chunk] @ keys.T


def _split_ranks(ranks: Callable[..., torch.Tensor], queries: torch.Tensor, keys: torch.Tensor,
                 owner: torch.Tensor) -> torch.Tensor:
    """`ranks` of every query; each rank scores a block of the query rows."""
    rows = rank_share(len(queries), comm.rank(), comm.world_size())
    return comm.gather_rows(ranks(queries[rows.start : rows.stop], keys, owner, first=rows.start))


def image_to_text_ranks(images: torch.Tensor, captions: torch.Tensor, owner: torch.Tensor, first: int = 0,
                        chunk: int = 1024) -> torch.Tensor:
    """0-based rank of image `first + i`'s best-scored own caption among all captions (`owner[c]` is caption
    c's image): the other images' captions scoring at least as high, ties against the match, so a collapsed
    model scores no recall (nor do NaN features: their rank is the number of captions)."""
    ranks = torch.empty(len(images), dtype=torch.int64, device=images.device)
    for start, scores in _score_blocks(images, captions, chunk):
        rows = torch.arange(len(scores), device=scores.device) + first + start
        own = owner.unsqueeze(0) == rows.unsqueeze(1)
        best = scores.masked_fill(~own, -math.inf).max(dim=1, keepdim=True).values
        counted = ((scores >= best) & ~own).sum(dim=1)
        ranks[start : start + len(scores)] = torch.where(best.squeeze(1).isfinite(), counted, len(captions))
    return ranks


def text_to_image_ranks(captions: torch.Tensor, images: torch.Tensor, owner: torch.Tensor, first: int = 0,
                        chunk: int = 1024) -> torch.Tensor:
    """0-based rank of caption `first + c`'s own image (`owner[first + c]`) among all images, ties against
    the match (NaN features: the number of images); every caption is a query."""
    ranks = torch.empty(len(captions), dtype=torch.int64, device=captions.device)
    for start, scores in _score_blocks(captions, images, chunk):
        rows = torch.arange(len(scores), device=scores.device)
        matched = scores[rows, owner[first + start : first + start + len(scores)]].unsqueeze(1)
        counted = (scores >= matched).sum(dim=1) - 1
        ranks[start : start + len(scores)] = torch.where(matched.squeeze(1).isfinite(), counted, len(images))
    return ranks


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of one batch with in-batch negatives (open_clip's ClipLoss on one rank)."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def blockwise_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        batch_size: int) -> float:
    """Sample-weighted mean `clip_loss` of consecutive blocks of `batch_size` pairs (the last may be
    short), as one process reading the set in batches of that size sees them. Every rank computes it
    whole: it costs a batch's width per pair, nothing next to the recall ranks."""
    total = torch.zeros((), dtype=torch.float64, device=image_features.device)
    for start in range(0, len(image_features), batch_size):
        images, texts = image_features[start : start + batch_size], text_features[start : start + batch_size]
        total += clip_loss(images, texts, logit_scale).double() * len(images)
    return float(total) / len(image_features)


def log_mean_exp_negatives(queries: torch.Tensor, keys: torch.Tensor, tau: float, first: int = 0,
                           chunk: int = 1024) -> torch.Tensor:
    """log(1/(n-1) * sum over keys j != i of exp((<q_i, k_j> - <q_i, k_i>) / tau)) for each query i, whose own
    key is `first + i`: the log of FastCLIP's g_i over the whole set of n keys (what its estimator u tracks),
    in row chunks so memory stays O(chunk * n); a log-sum-exp, finite at any temperature."""
    out = torch.empty(len(queries), dtype=torch.float32, device=queries.device)
    for start, scores in _score_blocks(queries, keys, chunk):
        scores = scores.float()
        rows = torch.arange(len(scores), device=scores.device)
        own = rows + first + start
        logits = (scores - scores[rows, own].unsqueeze(1)) / tau
        logits[rows, own] = -math.inf
        out[start : start + len(scores)] = torch.logsumexp(logits, dim=1) - math.log(len(keys) - 1)
    return out


def global_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, tau: float) -> float:
    """The global contrastive loss of a set of pairs at temperature `tau`: the mean over pairs and both sides
    (image anchors against every text, text anchors against every image) of log g, every other pair of the set
    a negative. Unlike a mini-batch loss it does not depend on how the set is batched, which makes it the
    low-noise measure of what FastCLIP optimises. The ranks split the anchors; every rank returns the value."""
    rows = rank_share(len(image_features), comm.rank(), comm.world_size())
    sums = torch.zeros(2, dtype=torch.float64, device=image_features.device)
    if len(rows):
        sums[0] = log_mean_exp_negatives(image_features[rows.start : rows.stop], text_features, tau,
                                         first=rows.start).double().sum()
        sums[1] = log_mean_exp_negatives(text_features[rows.start : rows.stop], image_features, tau,
                                         first=rows.start).double().sum()
    return float(comm.all_reduce_sum(sums).sum()) / (2 * len(image_features))


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


def _show_progress() -> bool:
    return comm.rank() == 0 and sys.stderr.isatty()


def _progress(items: Iterable[T], what: str) -> Iterable[T]:
    """A progress bar on rank 0 when stderr is a terminal (never in a log file, never K bars)."""
    return tqdm(items, desc=what, unit="batch", leave=False, disable=not _show_progress())


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


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda", **worker_arguments(workers)
    )
