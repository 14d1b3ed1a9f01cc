"""FastCLIP's loss in a plain PyTorch training loop, one process (CPU or one GPU).

    python examples/single_process.py                 # FastCLIP-v3, 6 epochs over 1024 Fashion-MNIST pairs
    python examples/single_process.py --loss openclip # or v0, v1, v2, siglip: the same loop
    python examples/single_process.py --stop-epochs 3 && python examples/single_process.py --resume

Everything that concerns FastCLIP is marked "FastCLIP:"; the rest is an ordinary CLIP loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from example_utils import OUT, FashionPairs, tiny_model, zero_shot_top1
from fastclip import create_loss
from fastclip.distributed.threads import configure_cpu_threads
from fastclip.train.schedules import cosine_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="v3", choices=("v0", "v1", "v2", "v3", "openclip", "siglip"))
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--stop-epochs", type=int, default=None, help="stop after this many epochs (then --resume)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=10, help="steps")
    parser.add_argument("--out", type=Path, default=OUT, help="where the checkpoint goes")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_cpu_threads(device, loader_workers=1)  # on a CPU, cores left to the loader's worker
    model, train_transform, eval_transform, tokenizer = tiny_model(args.loss, device)
    pairs = FashionPairs(args.pairs, train_transform, tokenizer)
    shuffle = torch.Generator()  # seeded by epoch below: a resumed run sees the same order and augmentations
    loader = DataLoader(pairs, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=1,
                        generator=shuffle)

    # FastCLIP: one moving average per pair, indexed by the pair's dataset index (FashionPairs' third value);
    # u averages over about half the epochs (the paper: 18 of 37)
    loss_fn = create_loss(args.loss, data_size=len(pairs), gamma_decay_epochs=max(1, args.epochs // 2), device=device)
    # FastCLIP: its groups put v3's temperature in its own group (lr_tau) and freeze it where it is not learnt
    optimizer = torch.optim.AdamW(loss_fn.param_groups(model, lr=args.lr, weight_decay=0.1), betas=(0.9, 0.98), eps=1e-6)
    total_steps = len(loader) * args.epochs  # warmup, then cosine decay (open_clip's schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(1.0, args.warmup, total_steps, step))
    checkpoint = args.out / f"single_process_{args.loss}.pt"
    start = 0
    if args.resume:
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loss_fn.load_state_dict(state["loss"])  # FastCLIP: every pair's u (one process: the whole table)
        start = state["epoch"]

    for epoch in range(start, args.stop_epochs or args.epochs):
        loss_fn.set_epoch(epoch)  # FastCLIP: gamma is 1 in epoch 0, then decays
        shuffle.manual_seed(epoch)
        for images, texts, index in loader:
            out = model(images.to(device), texts.to(device))
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], index.to(device),
                           logit_bias=out.get("logit_bias"))  # logit_bias: SigLIP's
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_fn.set_temperature_lr(optimizer)  # FastCLIP-v3: after the scheduler, lr_tau (/ 3 once tau <= 0.03)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # tau in [0.01, 1], as open_clip_train
        values = {k: round(v, 4) for k, v in loss_fn.log_values().items()}
        print(f"epoch {epoch}: loss {loss.item():.4f} {values}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "loss": loss_fn.state_dict(), "epoch": epoch + 1}, checkpoint)

    print(json.dumps({"loss": args.loss, "epochs": args.stop_epochs or args.epochs, "pairs": len(pairs),
                      "zeroshot_top1": zero_shot_top1(model, eval_transform, tokenizer),
                      "checkpoint": str(checkpoint), "seconds": round(time.time() - started, 1)}), flush=True)


if __name__ == "__main__":  # DataLoader workers import this file again: without the guard each would train
    main()
