"""Command line of the training script.

The spellings are those of the FastCLIP seed commands (`--train-data` with a dash, `--data_size` with
an underscore, ...); every flag also answers to its other spelling, so `--data-size` works too.
Parsing ends in `resolve()`, which fills model-dependent defaults and rejects inconsistent
combinations with a message that says what to change.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

TEMPERATURE_SCHEMES = ("global_learnable", "global_constant", "individual_learnable")
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose `add` registers both the dash and the underscore spelling of a flag."""

    def add(self, flag: str, **kwargs) -> None:
        spellings = [flag]
        for other in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
            if other not in spellings:
                spellings.append(other)
        kwargs.setdefault("dest", flag[2:].replace("-", "_"))
        self.add_argument(*spellings, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="FastCLIP / OpenCLIP training", allow_abbrev=False)

    # data
    p.add("--train-data", type=str, default=None, help="webdataset shards: brace patterns, '::'-joined lists")
    p.add("--val-data", type=str, default=None, help="webdataset shards for retrieval evaluation")
    p.add("--train-num-samples", type=int, default=None, help="samples per epoch (sets steps per epoch)")
    p.add("--val-num-samples", type=int, default=None, help="evaluate retrieval on the first N pairs of --val-data (default: all)")
    p.add("--data_size", type=int, default=None, help="upper bound (exclusive) of sample keys; FastCLIP state size")
    p.add("--dataset-type", choices=("webdataset", "synthetic", "auto"), default="auto")
    p.add("--imagenet-val", type=str, default=None, help="ImageNet-style folder for zero-shot evaluation")
    p.add("--zeroshot-classnames", type=str, default=None, help="class names file for --imagenet-val")
    p.add("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    p.add("--batch-size", type=int, default=64, help="batch size per rank")

    # model
    p.add("--model", type=str, default="RN50", help="open_clip model name or local-dir:PATH")
    p.add("--pretrained", type=str, default=None, help="open_clip pretrained tag or checkpoint path")
    p.add("--temperature", type=float, default=0.07, help="initial temperature tau (logit_scale = log(1/tau))")
    p.add("--grad-checkpointing", action="store_true")
    p.add("--torchcompile", action="store_true")

    # optimisation
    p.add("--epochs", type=int, default=32)
    p.add("--stop_epochs", type=int, default=None, help="stop after this epoch; schedules still span --epochs")
    p.add("--lr", type=float, default=None, help="model learning rate (default by model, as open_clip)")
    p.add("--beta1", type=float, default=None)
    p.add("--beta2", type=float, default=None)
    p.add("--eps", type=float, default=None)
    p.add("--wd", type=float, default=0.2, help="weight decay (not applied to gains, biases, logit_scale)")
    p.add("--warmup", type=int, default=10000, help="warmup steps of the model learning rate")
    p.add("--lr-scheduler", choices=("cosine", "const", "const-cooldown"), default="cosine")
    p.add("--epochs-cooldown", type=int, default=None, help="const-cooldown: epochs of linear cooldown")
    p.add("--lr-cooldown-end", type=float, default=0.0)
    p.add("--grad-clip-norm", type=float, default=None)
    p.add("--precision", choices=PRECISIONS, default="auto", help="auto: fp32 on CPU, amp (bf16 if supported) on GPU")

    # loss
    p.add("--local-loss", action="store_true", help="OpenCLIP: local-batch logits against gathered features")
    p.add("--gather-with-grad", action="store_true", help="OpenCLIP: back-propagate through the all-gather")
    p.add("--fastclip", action="store_true", help="train with a FastCLIP global contrastive objective")
    p.add("--temperature_scheme", choices=TEMPERATURE_SCHEMES, default="global_learnable")
    p.add("--multiply_tau", action="store_true", help="FastCLIP-v3 (RGCL-g) loss with a global learnable tau")
    p.add("--gamma", type=float, default=0.2, help="final inner learning rate of the moving averages u")
    p.add("--gamma_schedule", choices=("cosine", "constant"), default="cosine")
    p.add("--gamma_decay_epochs", type=int, default=None, help="epochs until gamma reaches --gamma (default epochs/2)")
    p.add("--rho", type=float, default=6.5, help="RGCL constraint weight (v2, v3)")
    p.add("--lr_tau", type=float, default=-1.0, help="temperature learning rate; < 0 means --lr")
    p.add("--lr_tau_scheduler", choices=("const", "step_thresh", "cosine"), default=None)
    p.add("--fastclip_eps", type=float, default=1e-14, help="eps in g / (eps + u)")

    # run, logging, checkpoints
    p.add("--name", type=str, default=None, help="run name: folder under --logs")
    p.add_argument("--logs", "--logs-dir", dest="logs", type=str, default="./logs",
                   help="where run folders go; under torchrun use --logs-dir (torchrun takes --logs as its own)")
    p.add("--seed", type=int, default=0)
    p.add("--resume", type=str, default=None, help="checkpoint path, or 'latest' in this run's folder")
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
    p.add("--zeroshot-frequency", type=int, default=2, help="zero-shot evaluation every N epochs")
    p.add("--val-frequency", type=int, default=1, help="retrieval evaluation every N epochs")
    p.add("--log-every-n-steps", type=int, default=100)
    p.add("--report-to", type=str, default="", help="comma list of tensorboard, wandb")
    p.add("--profile", action="store_true", help="time the phases of every step and log them")

    # distributed
    p.add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add("--dist-backend", type=str, default=None, help="default: nccl on GPU, gloo on CPU")
    p.add("--dist-url", type=str, default="env://")
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


def _validate_fastclip(args: argparse.Namespace) -> None:
    if args.gather_with_grad:
        _fail("--fastclip computes its gradient without a collective in backward; drop --gather-with-grad")
    if not 0.0 < args.gamma <= 1.0:
        _fail(f"--gamma must be in (0, 1], got {args.gamma}")
    if args.multiply_tau and not args.temperature_scheme.startswith("global"):
        _fail("--multiply_tau (FastCLIP-v3) needs a global temperature scheme, not " + args.temperature_scheme)
    if args.temperature_scheme == "individual_learnable" and args.lr_tau_scheduler not in (None, "const"):
        _fail("--temperature_scheme individual_learnable updates per-sample temperatures with a constant "
              "--lr_tau: use --lr_tau_scheduler const")
    if args.data_size is None:
        _fail("--fastclip keeps state per sample: pass --data_size, larger than the largest sample key "
              "(img2dataset keys are sparse unless the shard size is a power of ten)")
    if args.data_size < 1 or (args.train_num_samples and args.data_size < args.train_num_samples):
        _fail(f"--data_size {args.data_size} is smaller than --train-num-samples {args.train_num_samples}; "
              "it must exceed the largest sample key of the shards")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on other flags and reject inconsistent combinations."""
    for key, value in _model_optimizer_defaults(args.model).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset_type == "auto":
        args.dataset_type = "webdataset" if args.train_data else ("synthetic" if args.train_num_samples else "none")
    if args.dataset_type == "synthetic" and args.data_size is None and args.train_num_samples:
        args.data_size = args.train_num_samples
    if args.dataset_type == "webdataset" and args.train_data and not args.train_num_samples:
        _fail("--train-data needs --train-num-samples (webdataset shards have no length)")
    if args.fastclip:
        _validate_fastclip(args)
    if args.lr_tau < 0:
        args.lr_tau = args.lr
    if args.lr_tau_scheduler is None:
        args.lr_tau_scheduler = "const" if args.temperature_scheme == "individual_learnable" else "cosine"
    if args.gamma_decay_epochs is None:
        args.gamma_decay_epochs = max(1, args.epochs // 2)
    if args.lr_scheduler == "const-cooldown" and not args.epochs_cooldown:
        _fail("--lr-scheduler const-cooldown needs --epochs-cooldown")
    if args.stop_epochs is None:
        args.stop_epochs = args.epochs
    if args.name is None:
        args.name = "-".join(
            [args.model.replace("/", "-"), "fastclip" if args.fastclip else "openclip", f"b{args.batch_size}",
             f"lr{args.lr}", f"s{args.seed}"]
        )
    args.report_to = [r for r in args.report_to.split(",") if r]
    for flag in ("save_every_n_steps", "save_every_minutes"):
        if getattr(args, flag) < 0:
            _fail(f"--{flag.replace('_', '-')} must be >= 0 (0: off), got {getattr(args, flag)}")
    if args.max_bad_steps < 1:
        _fail(f"--max-bad-steps must be >= 1, got {args.max_bad_steps}")
    if not args.dist_timeout > 0:
        _fail(f"--dist-timeout is in minutes and must be > 0, got {args.dist_timeout}")
    if not math.isfinite(args.temperature) or not 0.0 < args.temperature <= 1.0:
        _fail(f"--temperature must be in (0, 1], got {args.temperature}")
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return resolve(build_parser().parse_args(argv))


def save_params(args: argparse.Namespace, run_dir: Path) -> None:
    """Record the resolved configuration of a run as params.json (and open_clip's params.txt)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in sorted(vars(args).items())}
    (run_dir / "params.json").write_text(json.dumps(values, indent=2, default=str) + "\n")
    (run_dir / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
