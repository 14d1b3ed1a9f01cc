"""Fine-tuning a pretrained model on another data set, as most CLIP users do: pretrain on Fashion-MNIST, then
fine-tune with FastCLIP-v3 from that checkpoint (`--pretrained PATH`) on handwritten digits. The digits'
zero-shot accuracy must rise above the pretrained model's."""

from __future__ import annotations

import pytest

from conftest import SEED_COMMANDS, scaled, tiny_run
from training.main import main

pytest.importorskip("sklearn")

from fastclip.datasets.digits import build_digits  # noqa: E402


def test_fastclip_v3_fine_tunes_a_pretrained_checkpoint_on_new_data(demo_data, tmp_path):
    logs = tmp_path / "logs"
    main(scaled(SEED_COMMANDS["openclip"], **tiny_run(demo_data, logs, "pretrain", epochs=2)))
    pretrained = logs / "pretrain" / "checkpoints" / "epoch_2.pt"
    digits = build_digits(tmp_path / "digits", samples_per_shard=300, test_size=300)
    evaluate = ["--imagenet-val", str(digits.test_dir), "--model", "ViT-Tiny-32px", "--workers", "0",
                "--logs-dir", str(logs)]
    before = main(["--epochs", "0", "--pretrained", str(pretrained), "--name", "before", *evaluate])
    # the README's recipe: a smaller lr than from scratch, a short warmup, gamma decayed over half the epochs
    run = {**tiny_run(digits, logs, "finetune", epochs=4), "lr": "5e-4", "warmup": "10", "gamma_decay_epochs": 2}
    after = main([*scaled(SEED_COMMANDS["fastclip-v3"], **run), "--pretrained", str(pretrained),
                  "--imagenet-val", str(digits.test_dir), "--zeroshot-frequency", "4"])
    top1 = "imagenet-zeroshot-val-top1"
    assert after[top1] > before[top1] + 0.2, (before[top1], after[top1])
