"""FastCLIP's loss in a Hugging Face Accelerate loop (`pip install -e '.[examples]'` installs accelerate).

    python examples/accelerate_loop.py                     # 2 processes on the CPU (started through torchrun)
    accelerate launch --num_processes 2 examples/accelerate_loop.py    # the same through accelerate's launcher
    python examples/accelerate_loop.py --stop-epochs 2 && python examples/accelerate_loop.py --resume

Accelerate sets up the process group and wraps the model in DDP; the loss built after `Accelerator()`
works over the global batch. Accelerate's own checkpoint (`save_state`) writes registered objects from
the main process only, so each rank saves FastCLIP's per-pair shard itself. What concerns FastCLIP is
marked "FastCLIP:".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader

from example_utils import OUT, FashionPairs, relaunch_with_torchrun, tiny_model, under_launcher, zero_shot_top1
from fastclip import create_loss
from fastclip.distributed.threads import configure_cpu_threads
from fastclip.train.schedules import cosine_lr


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="v3", choices=("v0", "v1", "v2", "v3", "openclip", "siglip"))
    parser.add_argument("--nproc", type=int, default=2, help="processes to start when run without a launcher")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stop-epochs", type=int, default=None, help="stop after this many epochs (then --resume)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=10, help="steps")
    parser.add_argument("--out", default=str(OUT / "accelerate_loop"), help="checkpoint folder")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    started = time.time()
    # the process group (gloo on the CPU); a shuffle seeded by epoch, so that --resume continues the same stream
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    configure_cpu_threads(accelerator.device, loader_workers=1)
    torch.manual_seed(0)
    model, train_transform, eval_transform, tokenizer = tiny_model(args.loss, accelerator.device)
    pairs = FashionPairs(args.pairs, train_transform, tokenizer)  # items (image, tokens, index)
    loader = DataLoader(pairs, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=1)
    # FastCLIP: built after Accelerator(), so that it works over every process's batch
    loss_fn = create_loss(args.loss, data_size=len(pairs), gamma_decay_epochs=max(1, args.epochs // 2),
                          device=accelerator.device)
    optimizer = torch.optim.AdamW(loss_fn.param_groups(model, lr=args.lr, weight_decay=0.1), betas=(0.9, 0.98),
                                  eps=1e-6)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = len(loader) * args.epochs  # len(loader): this process's batches; warmup, then cosine decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(1.0, args.warmup, total_steps, step))
    accelerator.register_for_checkpointing(scheduler)  # the same on every process: the main one saves it
    folder = f"{args.out}/checkpoint"
    shard = f"{folder}/fastclip_rank{accelerator.process_index}.pt"
    start = 0
    if args.resume:
        accelerator.load_state(folder)
        state = torch.load(shard, weights_only=True)
        loss_fn.load_state_dict(state["loss"])  # FastCLIP: this rank's shard of the per-pair table
        start = state["next_epoch"]

    for epoch in range(start, args.stop_epochs or args.epochs):
        loss_fn.set_epoch(epoch)  # FastCLIP: gamma's schedule is by epoch
        loader.set_epoch(epoch)
        for images, texts, index in loader:
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], index,
                           logit_bias=out.get("logit_bias"))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            loss_fn.set_temperature_lr(optimizer)  # FastCLIP-v3: after the scheduler, the temperature's own lr
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                accelerator.unwrap_model(model).logit_scale.clamp_(0, math.log(100))
        values = {k: round(v, 4) for k, v in loss_fn.log_values().items()}
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f} {values}")
        accelerator.save_state(folder)  # model, optimizer, random states: written by the main process
        torch.save({"loss": loss_fn.state_dict(), "next_epoch": epoch + 1}, shard)  # FastCLIP: by every rank
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        print(json.dumps({"loss": args.loss, "processes": accelerator.num_processes,
                          "epochs": args.stop_epochs or args.epochs, "pairs": len(pairs),
                          "zeroshot_top1": zero_shot_top1(accelerator.unwrap_model(model), eval_transform, tokenizer),
                          "out": args.out, "seconds": round(time.time() - started, 1)}), flush=True)
    accelerator.end_training()


if __name__ == "__main__":  # DataLoader workers import this file again: the guard keeps them from training
    if under_launcher() or parse_args().nproc == 1:
        main(parse_args())
    else:
        relaunch_with_torchrun(__file__, parse_args().nproc, sys.argv[1:])
