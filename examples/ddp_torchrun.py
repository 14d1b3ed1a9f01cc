"""FastCLIP's loss in a DistributedDataParallel loop started by torchrun (gloo on CPUs, NCCL on GPUs).

    python examples/ddp_torchrun.py                         # starts 2 ranks through torchrun itself
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py    # the same
    python examples/ddp_torchrun.py --stop-epochs 1 && python examples/ddp_torchrun.py --resume

It reads Fashion-MNIST shards through the project's data loader and follows the training script's recipe
(seed, model initialisation, AdamW groups, open_clip's cosine schedule), so that it and
`python -m training.main` with the same flags train the same model step by step (tests/test_loss_api.py
checks it). In your code, your own data loader and lr scheduler take their places; what concerns FastCLIP
is marked "FastCLIP:".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from example_utils import DATA, OUT, relaunch_with_torchrun, tiny_model, under_launcher, zero_shot_top1
from fastclip import ContrastiveLoss, create_loss
from fastclip.data.loader import build_train_loader
from fastclip.datasets.demo import build_demo
from fastclip.distributed.threads import configure_cpu_threads
from fastclip.train.schedules import cosine_lr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="v3", choices=("v0", "v1", "v2", "v3", "openclip", "siglip"))
    parser.add_argument("--nproc", type=int, default=2, help="ranks to start when run without a launcher")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4, help="epochs the schedules span")
    parser.add_argument("--stop-epochs", type=int, default=None, help="stop after this many epochs (then --resume)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--data", type=Path, default=None, help=f"shards folder (default {DATA}/fashion-mnist-PAIRS)")
    parser.add_argument("--out", type=Path, default=OUT / "ddp_torchrun", help="checkpoint and losses.jsonl")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    return parser.parse_args(argv)


def save(folder: Path, model: DistributedDataParallel, optimizer: torch.optim.Optimizer, loss_fn: ContrastiveLoss,
         epoch: int) -> None:
    """Your own checkpoint: the model and optimizer once (rank 0), FastCLIP's state by every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    folder.mkdir(parents=True, exist_ok=True)
    # FastCLIP: each rank saves its shard of the per-pair table (n / K pairs' values), no collective
    torch.save({"loss": loss_fn.state_dict()}, folder / f"loss_rank{rank}.pt")
    dist.barrier()  # every shard is written before the file that names them
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "loss_shards": world}, folder / "model.pt")
    dist.barrier()


def load(folder: Path, model: DistributedDataParallel, optimizer: torch.optim.Optimizer,
         loss_fn: ContrastiveLoss) -> int:
    """Restore `save`'s checkpoint; the epoch to continue with."""
    state = torch.load(folder / "model.pt", weights_only=True)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # FastCLIP: on as many ranks as saved it, each rank's own shard; on another number, each rank takes the
    # rows it now owns out of the shards (memory-mapped: only those rows are read)
    shards = [torch.load(folder / f"loss_rank{k}.pt", mmap=True, weights_only=True)["loss"]
              for k in range(state["loss_shards"])]
    loss_fn.load_state_dict(shards[dist.get_rank()] if len(shards) == dist.get_world_size() else shards)
    return state["epoch"]


def main(args: argparse.Namespace) -> None:
    started = time.time()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    configure_cpu_threads(device, args.workers)  # on a CPU, the cores shared among the ranks and their workers
    folder = args.data or DATA / f"fashion-mnist-{args.pairs}"
    if rank == 0:
        build_demo(folder, samples_per_shard=args.samples_per_shard, limit=args.pairs)
    dist.barrier()
    data = build_demo(folder, samples_per_shard=args.samples_per_shard, limit=args.pairs)  # built: read back

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, train_transform, eval_transform, tokenizer = tiny_model(args.loss, device)
    loader = build_train_loader(data.train_shards, train_transform, tokenizer, args.batch_size, data.num_samples,
                                seed=args.seed, rank=rank, world_size=world, workers=args.workers,
                                data_size=data.data_size)  # batches of {"image", "text", "index"}
    # FastCLIP: built after init_process_group, it works over the global batch; index < data_size
    loss_fn = create_loss(args.loss, data_size=data.data_size, gamma_decay_epochs=max(1, args.epochs // 2),
                          device=device)
    optimizer = torch.optim.AdamW(loss_fn.param_groups(model, args.lr, args.wd), betas=(0.9, 0.98), eps=1e-6)
    model = DistributedDataParallel(model, device_ids=[device] if cuda else None)
    steps_per_epoch = len(loader)
    start = load(args.out, model, optimizer, loss_fn) if args.resume else 0

    for epoch in range(start, args.stop_epochs or args.epochs):
        loader.set_epoch(epoch)
        loss_fn.set_epoch(epoch)  # FastCLIP: gamma's schedule is by epoch
        model.train()
        losses = []
        for i, batch in enumerate(loader):
            lr = cosine_lr(args.lr, args.warmup, steps_per_epoch * args.epochs, epoch * steps_per_epoch + i)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_fn.set_temperature_lr(optimizer)  # FastCLIP-v3: the temperature's own lr, after the scheduler
            images, texts, index = (batch[key].to(device, non_blocking=True) for key in ("image", "text", "index"))
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], index,
                           logit_bias=out.get("logit_bias"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the ranks' gradients: the global batch's
            optimizer.step()
            with torch.no_grad():
                model.module.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.detach())
        if rank == 0:  # one read of the epoch's losses from the device
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "losses.jsonl", "a" if epoch else "w") as f:
                for i, value in enumerate(torch.stack(losses).tolist()):
                    f.write(json.dumps({"step": epoch * steps_per_epoch + i + 1, "epoch": epoch, "loss": value}) + "\n")
            values = {k: round(v, 4) for k, v in loss_fn.log_values().items()}
            print(f"epoch {epoch}: loss {value:.4f} {values}", flush=True)
        save(args.out, model, optimizer, loss_fn, epoch + 1)

    if rank == 0:
        print(json.dumps({"loss": args.loss, "ranks": world, "epochs": args.stop_epochs or args.epochs,
                          "pairs": data.num_samples, "zeroshot_top1": zero_shot_top1(model.module, eval_transform,
                                                                                     tokenizer),
                          "out": str(args.out), "seconds": round(time.time() - started, 1)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # DataLoader workers import this file again: the guard keeps them from training
    if under_launcher():
        main(parse_args())
    else:
        relaunch_with_torchrun(__file__, parse_args().nproc, sys.argv[1:])
