"""Command line of the training script.

The spellings are those of the FastCLIP seed commands (`--train-data` with a dash, `--data_size` with
an underscore, ...); every flag also answers to its other spelling, so `--data-size` works too.
Parsing ends in `resolve()`, which fills defaults that depend on other flags and rejects bad values
and inconsistent combinations with a one-line message that says what to change. It reads no file:
checks of paths, model names and checkpoints run at the start of `training.main.main`, and a run that
resumes without `--model` takes the model its checkpoint records (`model_defaults`). The resolved flags
become a `training.config.Config`; nothing changes them after this module.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from fastclip import rules
from fastclip.model_options import SIGLIP_LOGIT_BIAS, SIGLIP_TEMPERATURE, ModelOptions
from training.config import Config, trains
from training.paths import rebased_paths

TEMPERATURE_SCHEMES = ("global_learnable", "global_constant", "individual_learnable")
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")
DEFAULT_MODEL = "RN50"
DEFAULT_TEMPERATURE = 0.07
# The smallest value of each numeric flag, and what that value means where it means something special.
MINIMUM = {
    "batch_size": (1, ""), "workers": (0, " (0: load in the training process)"), "epochs": (0, " (0: evaluate only)"),
    "stop_epochs": (1, ""), "warmup": (0, " (0: no warmup)"), "train_num_samples": (1, ""),
    "val_num_samples": (1, ""), "train_eval_num_samples": (0, " (0: off)"), "data_size": (1, ""),
    "epochs_cooldown": (1, ""), "gamma_decay_epochs": (1, ""), "clamp_u_to_g": (1, " (1: the mini-batch's normalisation)"),
    "wd": (0, ""), "lr_cooldown_end": (0, ""), "rho": (0, ""), "seed": (0, ""), "save_frequency": (0, " (0: never)"),
    "save_every_n_steps": (0, " (0: off)"), "save_every_minutes": (0, " (0: off)"), "max_bad_steps": (1, ""),
    "zeroshot_frequency": (0, " (0: after the last epoch only)"),
    "val_frequency": (0, " (0: after the last epoch only)"),
    "log_every_n_steps": (1, ""), "accum_freq": (1, " (1: no accumulation)"),
    "remote_sync_frequency": (1, ""), "lock_image_unlocked_groups": (0, ""), "lock_text_unlocked_layers": (0, ""),
}
POSITIVE = ("lr", "eps", "grad_clip_norm", "fastclip_eps", "dist_timeout")
AUTO = "auto"  # --train-num-samples / --data_size: counted from the --train-data shards when the run starts


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; a default of None or False is explained by the help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose `add` registers both the dash and the underscore spelling of a flag."""

    def add(self, flag: str, **kwargs) -> None:
        spellings = [flag]
        for other in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
            if other not in spellings:
                spellings.append(other)
        kwargs.setdefault("dest", flag[2:].replace("-", "_"))
        self.add_argument(*spellings, **kwargs)


class _KeyValues(argparse.Action):
    """`--aug-cfg scale='(0.5, 1)' color_jitter=0.4`: a dict, each value a Python literal where it parses
    as one, else the string (open_clip_train's convention)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parsed = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} takes KEY=VALUE pairs, got {item!r}")
            try:
                parsed[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed[key] = value
        setattr(namespace, self.dest, parsed)


def _count_or_auto(text: str) -> int | str:
    """A sample count, or 'auto' for one the run reads from its shards' index."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="FastCLIP / OpenCLIP training and zero-shot / retrieval evaluation. Every flag "
                "also answers to its other spelling (--data_size and --data-size).",
                formatter_class=_HelpFormatter, allow_abbrev=False)

    # data
    p.add("--train-data", type=str, default=None,
          help="training shards (webdataset tars as img2dataset writes them): a brace pattern such as "
               "'cc3m/{00000..00331}.tar', several joined with '::'; URLs and pipe: go to webdataset as they are; "
               "or a CSV of image paths and captions (--dataset-type csv)")
    p.add("--val-data", type=str, default=None,
          help="shards for image-text retrieval evaluation (recall@1/5/10), same syntax as --train-data; a CSV "
               "with --dataset-type csv")
    p.add("--train-num-samples", type=_count_or_auto, default=None,
          help="samples per epoch over all ranks: every rank runs ceil(N / (batch size x ranks)) steps; auto: "
               "the samples of --train-data (python -m fastclip.data.index, cached beside the shards)")
    p.add("--val-num-samples", type=int, default=None,
          help="evaluate retrieval on the first N pairs of --val-data in shard order, reading only the first N "
               "samples of each shard (default: all)")
    p.add("--train-eval-num-samples", type=int, default=0,
          help="also evaluate retrieval and the global contrastive loss on the first N pairs of --train-data "
               "(validation preprocessing; metrics train_subset_*) whenever --val-frequency is due: how well "
               "the objective is optimised, beside how it generalises (default 0: off)")
    p.add("--data_size", type=_count_or_auto, default=None,
          help="sample keys (the 'key' of each sample's .json) lie in [0, data_size): the number of rows of "
               "FastCLIP's per-sample state; required by --fastclip (a CSV's default: its rows); auto: the largest key "
               "of --train-data + 1")
    p.add("--dataset-type", choices=("webdataset", "csv", "synthetic", "auto"), default="auto",
          help="webdataset shards, a CSV of image paths and captions (--train-data and --val-data name the "
               "file; --train-num-samples and --data_size default to its rows), or synthetic random pairs for "
               "timing; auto: csv when --train-data ends in .csv or .tsv, else webdataset with --train-data, "
               "synthetic with --train-num-samples alone, else evaluation only")
    p.add("--csv-separator", type=str, default="\t", help="For csv-like datasets, which separator to use.")
    p.add("--csv-img-key", type=str, default="filepath",
          help="For csv-like datasets, the name of the key for the image paths.")
    p.add("--csv-caption-key", type=str, default="title",
          help="For csv-like datasets, the name of the key for the captions; several columns of captions of "
               "the same image, comma-separated, and a cell holding a JSON list, give several captions, one "
               "drawn per visit")
    p.add("--captions-per-line", action="store_true",
          help="webdataset: each line of a sample's .txt is one caption of its image (MS-COCO style; one is drawn "
               "per visit, all count in retrieval); without it a .txt is one caption. A .json 'captions' list "
               "always gives several")
    p.add("--imagenet-val", type=str, default=None,
          help="image folder with one sub-folder per class (e.g. ImageNet-1k val) for zero-shot classification")
    p.add("--zeroshot-classnames", type=str, default=None,
          help="file with one class name per line, in the sorted order of the --imagenet-val sub-folders "
               "(default: open_clip's ImageNet names for the 1000 synsets, else the folder names)")
    p.add("--dataset-resampled", action="store_true",
          help="webdataset: every worker draws shards with replacement (seeded), instead of passes over them")
    p.add("--train-data-upsampling-factors", type=str, default=None,
          help="with --dataset-resampled and '::'-joined --train-data sources: how often each source's shards are "
               "drawn, relative to each other, e.g. '1::2'")
    p.add("--workers", type=int, default=4,
          help="DataLoader worker processes per rank (0: load in the training process)")
    p.add("--batch-size", type=int, default=64,
          help="samples per rank and step; the global batch is this times the number of ranks")

    # model
    p.add("--model", type=str, default=None,
          help=f"open_clip model name (open_clip.list_models(), plus ViT-Tiny-32px and ViT-Small-32px), "
               f"hf-hub:ORG/REPO or local-dir:PATH (default: the model of the --resume checkpoint, else "
               f"{DEFAULT_MODEL})")
    p.add("--pretrained", type=str, default=None,
          help="open_clip pretrained tag (e.g. openai) or weights file to start from (default: random weights)")
    p.add("--temperature", type=float, default=None,
          help="initial temperature tau in (0, 1] (logit_scale = log(1/tau)); FastCLIP-v2 starts every "
               "per-sample tau here (default: 0.07; 0.1 with --siglip, open_clip's SigLIP logit scale log(10))")
    p.add("--grad-checkpointing", action="store_true",
          help="recompute activations in the backward pass (open_clip's set_grad_checkpointing): less memory, "
               "more compute")
    p.add("--torchcompile", action="store_true",
          help="compile the model with torch.compile: a slower start, faster steps")
    p.add("--cache-dir", type=str, default=None, help="where open_clip downloads pretrained weights and tokenizers")
    p.add("--pretrained-image", action="store_true",
          help="ImageNet-pretrained weights for the image tower where open_clip has them (timm towers)")
    p.add("--lock-image", action="store_true", help="freeze the image tower (open_clip's lock_image_tower)")
    p.add("--lock-image-unlocked-groups", type=int, default=0,
          help="--lock-image: leave the last N layer groups of the image tower trainable")
    p.add("--lock-image-freeze-bn-stats", action="store_true",
          help="--lock-image: keep the locked layers' BatchNorm statistics frozen")
    p.add("--lock-text", action="store_true", help="freeze the text tower (open_clip's lock_text_tower)")
    p.add("--lock-text-unlocked-layers", type=int, default=0,
          help="--lock-text: leave the last N layers of the text tower trainable")
    p.add("--lock-text-freeze-layer-norm", action="store_true",
          help="--lock-text: keep the locked layers' LayerNorm parameters frozen")
    p.add("--image-mean", type=float, nargs="+", default=None, help="override the model's image mean (1 or 3 values)")
    p.add("--image-std", type=float, nargs="+", default=None, help="override the model's image std (1 or 3 values)")
    p.add("--image-interpolation", choices=("bicubic", "bilinear", "random"), default=None,
          help="override the model's resize interpolation")
    p.add("--image-resize-mode", choices=("shortest", "longest", "squash"), default=None,
          help="override the model's evaluation resize (and crop) mode")
    p.add("--aug-cfg", nargs="*", default={}, action=_KeyValues,
          help="training augmentation, open_clip's AugmentationCfg as KEY=VALUE pairs (e.g. scale='(0.5, 1.0)')")
    p.add("--force-image-size", type=int, nargs="+", default=None, help="override the model's image size")
    p.add("--force-context-length", type=int, default=None, help="override the model's text context length")
    p.add("--force-quick-gelu", action="store_true", help="QuickGELU activations (as OpenAI's weights need)")
    p.add("--force-patch-dropout", type=float, default=None, help="override the ViT patch dropout rate")
    p.add("--force-custom-text", action="store_true", help="build the model as open_clip's CustomTextCLIP")

    # optimisation
    p.add("--epochs", type=int, default=32,
          help="epochs the schedules (learning rates, gamma) span; 0: only evaluate (--resume CKPT)")
    p.add("--stop_epochs", type=int, default=None,
          help="stop after this epoch; schedules still span --epochs (default: --epochs)")
    p.add("--lr", type=float, default=None,
          help="peak learning rate of the model's AdamW (default: open_clip_train's, 5e-4)")
    p.add("--beta1", type=float, default=None, help="AdamW beta1 (default: 0.9)")
    p.add("--beta2", type=float, default=None,
          help="AdamW beta2 (default: open_clip_train's, 0.98 for ViTs, else 0.999)")
    p.add("--eps", type=float, default=None,
          help="AdamW epsilon (default: open_clip_train's, 1e-6 for ViTs, else 1e-8)")
    p.add("--wd", type=float, default=0.2, help="AdamW weight decay (not applied to gains, biases, logit_scale)")
    p.add("--warmup", type=int, default=10000, help="steps of linear warmup of the learning rates")
    p.add("--lr-scheduler", choices=("cosine", "const", "const-cooldown"), default="cosine",
          help="model learning rate after warmup: cosine decay to 0, constant, or constant then a linear cooldown")
    p.add("--epochs-cooldown", type=int, default=None,
          help="const-cooldown: the last N epochs decay linearly to --lr-cooldown-end")
    p.add("--lr-cooldown-end", type=float, default=0.0, help="const-cooldown: learning rate at the end of the cooldown")
    p.add("--grad-clip-norm", type=float, default=None,
          help="clip the gradients' global L2 norm to this value (default: no clipping)")
    p.add("--precision", choices=PRECISIONS, default="auto",
          help="auto: fp32 on CPU, amp_bf16 (amp without bf16 support) on GPU; amp: float16 autocast with loss "
               "scaling (on the CPU too, slowly); amp_bf16: bfloat16 autocast; bf16, fp16: open_clip's low-"
               "precision weights (LayerNorm float32), inputs in that type; pure_bf16, pure_fp16: every weight "
               "in that type. FastCLIP's sums and per-sample state stay float32")
    p.add("--accum-freq", type=int, default=1,
          help="one optimizer step per N batches, with the gradient of the loss over all N (open_clip's "
               "feature-caching accumulation; OpenCLIP and SigLIP, not --fastclip)")
    p.add("--opt", type=str, default="adamw",
          help="adamw, or timm/NAME for a timm optimizer (e.g. timm/lamb) over the same parameter groups")
    p.add("--momentum", type=float, default=None, help="momentum of a timm optimizer that takes one (--opt timm/sgd)")
    p.add("--skip-scheduler", action="store_true",
          help="no learning-rate schedule: --lr from the first step, no warmup (the temperature's schedule stays)")
    p.add("--lr-cooldown-power", type=float, default=1.0,
          help="const-cooldown: the cooldown's power (1: linear, as (1 - t) ** power)")

    # loss
    p.add("--local-loss", action="store_true", help="OpenCLIP: local-batch logits against gathered features")
    p.add("--gather-with-grad", action="store_true", help="OpenCLIP: back-propagate through the all-gather")
    p.add("--fastclip", action="store_true", help="train with a FastCLIP global contrastive objective")
    p.add("--siglip", action="store_true",
          help="train with open_clip's SigLIP (sigmoid) loss; the model gets a learnable logit bias (init -10) "
               "and logit scale log(10), unless --temperature is given")
    p.add("--loss-dist-impl", choices=("bidir", "shift", "reduce", "gather"), default=None,
          help="--siglip: how ranks exchange features (open_clip's SigLipLoss dist_impl; default bidir)")
    p.add("--temperature_scheme", choices=TEMPERATURE_SCHEMES, default="global_learnable",
          help="FastCLIP temperature: global_learnable (v0; v3 with --multiply_tau), global_constant (v1), "
               "individual_learnable (v2: one learnable tau per sample); OpenCLIP takes global_constant too "
               "(tau fixed at --temperature, as FastCLIP-v1's)")
    p.add("--multiply_tau", action="store_true",
          help="FastCLIP-v3's RGCL-g loss (with --fastclip --temperature_scheme global_learnable)")
    p.add("--gamma", type=float, default=0.2,
          help="FastCLIP: final inner learning rate of the moving averages u, in (0, 1]")
    p.add("--gamma_schedule", choices=("cosine", "constant"), default="cosine",
          help="FastCLIP: gamma is 1 in epoch 0, then decays from 1 to --gamma over --gamma_decay_epochs (cosine) or "
               "is --gamma (constant)")
    p.add("--gamma_decay_epochs", type=int, default=None,
          help="FastCLIP: epochs until gamma reaches --gamma (default: --epochs / 2)")
    p.add("--rho", type=float, default=6.5, help="FastCLIP-v2/v3: weight of the RGCL temperature constraint")
    p.add("--lr_tau", type=float, default=-1.0, help="FastCLIP: learning rate of the temperature; < 0 means --lr")
    p.add("--lr_tau_scheduler", choices=("const", "step_thresh", "cosine"), default=None,
          help="FastCLIP: temperature learning rate schedule; step_thresh divides it by 3 at every step "
               "where tau <= 0.03 (default: const for individual_learnable, else cosine)")
    p.add("--fastclip_eps", type=float, default=1e-14, help="FastCLIP: eps in the ratio g / (eps + u)")
    p.add("--clamp_u_to_g", type=float, default=None, metavar="C",
          help="FastCLIP, opt-in (not the paper's): divide each anchor's weights by u clamped to within a factor C "
               "(>= 1) of the step's mini-batch estimate g, so that no step weighs an anchor more than C times, or "
               "less than 1/C times, the mini-batch softmax; for a few thousand pairs over many epochs (README: "
               "Which version, which flags)")

    # run, logging, checkpoints
    p.add("--name", type=str, default=None,
          help="run name: its folder under --logs (default: MODEL-LOSS-bBATCH-lrLR-sSEED)")
    p.add_argument("--logs", "--logs-dir", dest="logs", type=str, default="./logs",
                   help="where run folders go; under torchrun use --logs-dir (torchrun takes --logs as its own)")
    p.add("--seed", type=int, default=0,
          help="seed of the initial weights, the data order and the augmentations (>= 0)")
    p.add("--resume", type=str, default=None,
          help="continue from (or, with --epochs 0, evaluate) a checkpoint file, or 'latest': the newest good "
               "checkpoint of this run's folder (none yet: training starts from scratch)")
    p.add("--save-frequency", type=int, default=1, help="save a checkpoint every N epochs (0: never)")
    p.add("--save-most-recent", action="store_true", help="also keep epoch_latest.pt, rewritten every epoch")
    p.add("--delete-previous-checkpoint", action="store_true",
          help="delete older epoch_N.pt files once the new one is complete")
    p.add("--save-every-n-steps", type=int, default=0,
          help="also save epoch_latest.pt every N steps, mid-epoch (0: off); a resume continues the epoch exactly")
    p.add("--save-every-minutes", type=float, default=0.0,
          help="also save epoch_latest.pt every M minutes of training, mid-epoch (0: off)")
    p.add("--max-bad-steps", type=int, default=20,
          help="stop (exit 77) after N consecutive steps with NaN/inf gradients; such steps are always skipped")
    p.add("--zeroshot-frequency", type=int, default=2,
          help="zero-shot evaluation every N epochs, and after the last (0: after the last only)")
    p.add("--val-frequency", type=int, default=1,
          help="retrieval evaluation every N epochs, and after the last (0: after the last only)")
    p.add("--log-every-n-steps", type=int, default=100, help="a progress line (loss, samples/s, ETA) every N steps")
    p.add("--report-to", type=str, default="",
          help="also report training metrics to tensorboard and/or wandb (comma-separated); metrics.jsonl is "
               "always written")
    p.add("--wandb-project-name", type=str, default="open-clip", help="the wandb project (--report-to wandb)")
    p.add("--wandb-notes", type=str, default="", help="notes of the wandb run")
    p.add("--log-local", action="store_true",
          help="the first rank of every node logs (to out.log, or out-RANK.log on other nodes), not only rank 0")
    p.add("--remote-sync", type=str, default=None,
          help="also keep a copy of the run folder at REMOTE/NAME (an s3:// path, any fsspec URL or a folder); "
               "--resume latest fetches its checkpoints when the local folder has none")
    p.add("--remote-sync-frequency", type=int, default=300, help="seconds between two syncs to --remote-sync")
    p.add("--remote-sync-protocol", choices=("s3", "fsspec"), default="s3",
          help="s3: the aws CLI's `aws s3 sync`; fsspec: copy new or changed files with fsspec")
    p.add("--profile", action="store_true", help="time the phases of every step and log them")
    p.add("--debug", action="store_true", help="full tracebacks instead of one-line errors, and debug log lines")

    # distributed
    p.add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available, else the CPU")
    p.add("--dist-backend", type=str, default=None,
          help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    p.add("--dist-url", type=str, default="env://",
          help="rendezvous of the process group; env:// reads MASTER_ADDR and MASTER_PORT (127.0.0.1:29500 "
               "when unset)")
    p.add("--use-bn-sync", action="store_true", help="synchronise BatchNorm statistics over ranks (SyncBatchNorm)")
    p.add("--ddp-static-graph", action="store_true", help="DDP's static_graph optimisation")
    p.add("--no-set-device-rank", action="store_true",
          help="use cuda:0 on every rank (when the launcher gives each process its own CUDA_VISIBLE_DEVICES)")
    p.add("--dist-timeout", type=float, default=30.0,
          help="minutes a rank waits for the others in a collective before the run exits (code 76)")
    return p


def _model_optimizer_defaults(model: str) -> dict[str, float]:
    """open_clip_train's per-model AdamW defaults: ViTs use beta2 0.98 and eps 1e-6."""
    if "vit" in model.lower():
        return {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6}
    return {"lr": 5e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _is_number(value: object) -> bool:
    """False for unset flags and for words some numeric flags also take (e.g. 'auto')."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_numbers(args: argparse.Namespace) -> None:
    """Reject values that make no sense (a batch of 0, negative workers, a learning rate <= 0, NaN, ...)."""
    for dest, (minimum, meaning) in MINIMUM.items():
        value = getattr(args, dest, None)
        if _is_number(value) and not value >= minimum:
            _fail(f"{_flag(dest)} must be >= {minimum}{meaning}, got {value}")
    for dest in POSITIVE:
        value = getattr(args, dest, None)
        if _is_number(value) and not (value > 0 and math.isfinite(value)):
            _fail(f"{_flag(dest)} must be a number > 0, got {value}")
    for dest in ("beta1", "beta2"):
        value = getattr(args, dest)
        if value is not None and not 0.0 <= value < 1.0:
            _fail(f"{_flag(dest)} must be in [0, 1), got {value}")
    if args.temperature is None:
        args.temperature = SIGLIP_TEMPERATURE if args.siglip else DEFAULT_TEMPERATURE
    args.init_logit_bias = SIGLIP_LOGIT_BIAS if args.siglip else None
    if not math.isfinite(args.temperature) or not 0.0 < args.temperature <= 1.0:
        _fail(f"--temperature must be in (0, 1], got {args.temperature}")


def _validate_task(args: argparse.Namespace) -> None:
    """A run trains, evaluates or both; say what is missing when it would do neither or evaluate nothing."""
    if args.dataset_type == "webdataset" and not args.train_data:
        _fail("--dataset-type webdataset trains on shards: add --train-data SHARDS")
    if args.dataset_type == "csv" and not args.train_data and args.epochs > 0:
        _fail("--dataset-type csv trains on a CSV: add --train-data FILE.csv, or --epochs 0 to evaluate only")
    if args.dataset_type == "synthetic" and not args.train_num_samples:
        _fail("--dataset-type synthetic needs --train-num-samples N (random pairs per epoch)")
    if args.zeroshot_classnames and not args.imagenet_val:
        _fail("--zeroshot-classnames names the classes of --imagenet-val: add --imagenet-val DIR")
    if args.train_eval_num_samples and not (args.train_data and args.dataset_type in ("webdataset", "csv")):
        _fail("--train-eval-num-samples evaluates the first pairs of --train-data: it needs webdataset shards or a CSV")
    if trains(args.dataset_type, args.epochs):
        return
    if not (args.imagenet_val or args.val_data):
        if args.epochs > 0:
            _fail("nothing to do: pass --train-data SHARDS --train-num-samples N to train, or --epochs 0 "
                  "--resume CHECKPOINT --imagenet-val DIR (and/or --val-data SHARDS) to evaluate; see --help")
        _fail("--epochs 0 evaluates, but no evaluation is set: add --imagenet-val DIR and/or --val-data SHARDS, "
              "or train with --epochs N")
    if args.resume is None and args.pretrained is None:
        _fail("evaluating without --resume CHECKPOINT or --pretrained TAG would evaluate random weights: pass one")


def _validate_fastclip_only(args: argparse.Namespace) -> None:
    """FastCLIP's flags do nothing in an OpenCLIP run: name the missing --fastclip instead of ignoring them."""
    if args.multiply_tau:
        _fail("--multiply_tau selects FastCLIP-v3's loss: add --fastclip (without it the run trains OpenCLIP)")
    if args.clamp_u_to_g is not None:
        _fail("--clamp_u_to_g bounds FastCLIP's normaliser u: add --fastclip (OpenCLIP has no u)")
    if args.temperature_scheme == "individual_learnable":
        _fail("--temperature_scheme individual_learnable is FastCLIP-v2's per-sample temperature: add --fastclip "
              "(OpenCLIP learns one global temperature, or keeps it fixed with global_constant)")
    if args.siglip and args.temperature_scheme != "global_learnable":
        _fail("--siglip learns its logit scale with its bias: drop --temperature_scheme")


def _validate_options(args: argparse.Namespace) -> None:
    """Flags that only mean something together with another: name the missing one instead of ignoring them."""
    if args.dataset_resampled and args.dataset_type != "webdataset":
        _fail(f"--dataset-resampled draws webdataset shards with replacement; --dataset-type {args.dataset_type} "
              "has none: drop it")
    try:  # rules the library enforces too, written once there
        rules.check_upsampling(args.train_data_upsampling_factors, args.dataset_resampled)
        ModelOptions.from_record(vars(args))  # tower locking, forced sizes, preprocessing
        rules.check_optimizer(args.opt)
    except ValueError as error:
        _fail(str(error))
    if args.momentum is not None and not args.opt.lower().startswith("timm/"):
        _fail("--momentum is for timm optimizers (--opt timm/NAME); AdamW has betas (--beta1, --beta2)")
    if args.loss_dist_impl and not args.siglip:
        _fail("--loss-dist-impl chooses how SigLIP exchanges features: add --siglip")
    if args.siglip and (args.local_loss or args.gather_with_grad):
        _fail("--siglip exchanges features between neighbouring ranks itself: drop --local-loss / --gather-with-grad")


def _validate_fastclip(args: argparse.Namespace) -> None:
    if args.siglip:
        _fail("--siglip and --fastclip are two different objectives: pick one")
    if args.accum_freq > 1:
        _fail("--accum-freq with --fastclip would update the per-sample estimators u several times in one step "
              "(the reference asserts accum_freq == 1): drop it; FastCLIP is made for small batches")
    if args.gather_with_grad:
        _fail("--fastclip computes its gradient without a collective in backward; drop --gather-with-grad")
    if not 0.0 < args.gamma <= 1.0:
        _fail(f"--gamma must be in (0, 1], got {args.gamma}")
    try:
        rules.check_multiply_tau(args.multiply_tau, args.temperature_scheme)
    except ValueError as error:
        _fail(str(error))
    if args.temperature_scheme == "individual_learnable" and args.lr_tau_scheduler not in (None, "const"):
        _fail("--temperature_scheme individual_learnable updates per-sample temperatures with a constant "
              "--lr_tau: use --lr_tau_scheduler const")
    if args.data_size is None and args.dataset_type != "csv":  # a CSV's default is its number of rows
        _fail("--fastclip keeps state per sample: pass --data_size, larger than the largest sample key "
              "(img2dataset keys are sparse unless the shard size is a power of ten)")
    if _is_number(args.train_num_samples) and _is_number(args.data_size) and args.data_size < args.train_num_samples:
        _fail(f"--data_size {args.data_size} is smaller than --train-num-samples {args.train_num_samples}; "
              "it must exceed the largest sample key of the shards")


def _default_name(values: Mapping[str, Any], model: str) -> str:
    lr = values["lr"] if values["lr"] is not None else _model_optimizer_defaults(model)["lr"]
    loss = "fastclip" if values["fastclip"] else ("siglip" if values["siglip"] else "openclip")
    return "-".join([model.replace("/", "-"), loss, f"b{values['batch_size']}", f"lr{lr}", f"s{values['seed']}"])


def model_defaults(values: Mapping[str, Any], model: str, source: str) -> dict[str, Any]:
    """The flags that follow from the model: the model and where it came from (`source`, for the log), and
    the defaults that depend on it, AdamW's hyperparameters, --lr_tau and the run name. `values` are the
    resolved flags by dest; the result holds only what changes."""
    changes: dict[str, Any] = {"model": model, "model_source": source}
    for key, value in _model_optimizer_defaults(model).items():
        if values[key] is None:
            changes[key] = value
    if values["lr_tau"] < 0:
        changes["lr_tau"] = changes.get("lr", values["lr"])
    if values["name"] is None:
        changes["name"] = _default_name(values, model)
    return changes


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on other flags and reject bad values and inconsistent combinations.

    Without --model, a run that resumes keeps `model` None for `training.main` to take from the
    checkpoint (preflight, with `model_defaults`); `--resume latest` then looks in the default model's run folder.
    """
    _validate_numbers(args)
    vars(args).update(rebased_paths(vars(args)))
    if args.dataset_type == "auto" and args.train_data and args.train_data.endswith((".csv", ".tsv")):
        args.dataset_type = "csv"  # as open_clip_train decides
    if args.dataset_type == "auto":
        args.dataset_type = "webdataset" if args.train_data else ("synthetic" if args.train_num_samples else "none")
    if args.dataset_type == "synthetic" and args.train_num_samples == AUTO:
        _fail("--train-num-samples auto counts the samples of --train-data; synthetic pairs have no count: give N")
    if args.dataset_type == "synthetic" and args.data_size in (None, AUTO) and args.train_num_samples:
        args.data_size = args.train_num_samples
    if args.dataset_type == "webdataset" and args.train_data and not args.train_num_samples:
        _fail("--train-data needs --train-num-samples: N, or auto to count the shards once "
              "(python -m fastclip.data.index)")
    _validate_task(args)
    _validate_options(args)
    if args.fastclip:
        _validate_fastclip(args)
    else:
        _validate_fastclip_only(args)
    if args.lr_tau_scheduler is None:
        args.lr_tau_scheduler = "const" if args.temperature_scheme == "individual_learnable" else "cosine"
    if args.gamma_decay_epochs is None:
        args.gamma_decay_epochs = max(1, args.epochs // 2)
    if args.lr_scheduler == "const-cooldown" and not args.epochs_cooldown:
        _fail("--lr-scheduler const-cooldown needs --epochs-cooldown")
    if args.stop_epochs is None:
        args.stop_epochs = args.epochs
    args.report_to = [r for r in args.report_to.split(",") if r]
    if args.model is not None:
        vars(args).update(model_defaults(vars(args), args.model, "--model"))
    elif args.resume is None:
        vars(args).update(model_defaults(vars(args), DEFAULT_MODEL, "the default (no --model)"))
    elif args.name is None and args.resume == "latest":
        args.name = _default_name(vars(args), DEFAULT_MODEL)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked and resolved; reads no file and imports nothing heavy (`--help` is fast)."""
    return resolve(build_parser().parse_args(argv))


def save_params(config: Config, run_dir: Path) -> None:
    """Record the settled configuration of a run as params.json (and open_clip's params.txt)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    values = dict(sorted(config.flat().items()))
    (run_dir / "params.json").write_text(json.dumps(values, indent=2, default=str) + "\n")
    (run_dir / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
