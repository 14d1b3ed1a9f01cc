"""Flag parsing: every seed command line parses with the seed's meaning; bad combinations fail clearly."""

from __future__ import annotations

import pytest

from conftest import SEED_COMMANDS
from training.params import parse_args

SEED = SEED_COMMANDS


def test_fixture_holds_all_seed_commands():
    assert set(SEED) == {"fastclip-v0", "fastclip-v1", "fastclip-v2", "fastclip-v3", "openclip", "eval-imagenet"}


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_command_parses(name):
    args = parse_args(SEED[name])
    assert args.model == "RN50" and args.seed == 2024
    assert args.beta2 == 0.999 and args.eps == 1e-8  # open_clip's ResNet defaults


def test_seed_fastclip_v3_meaning():
    a = parse_args(SEED["fastclip-v3"])
    assert a.train_data == "./datasets/cc3m_webdataset/cc3m_train/{00000..00331}.tar"
    assert (a.train_num_samples, a.data_size, a.warmup, a.batch_size, a.epochs, a.workers) == (
        2723840, 3318333, 10000, 256, 37, 6)
    assert a.fastclip and a.multiply_tau and a.temperature_scheme == "global_learnable"
    assert (a.lr, a.lr_tau, a.lr_tau_scheduler, a.rho, a.wd) == (1e-3, 2e-4, "step_thresh", 6.5, 0.1)
    assert (a.gamma, a.gamma_schedule, a.gamma_decay_epochs) == (0.2, "cosine", 18)
    assert a.profile and a.local_loss and not a.gather_with_grad and a.save_frequency == 1
    assert a.name == "medium_fastclipv3" and a.stop_epochs == 37


def test_seed_versions_differ_as_in_the_paper():
    assert parse_args(SEED["fastclip-v0"]).temperature_scheme == "global_learnable"
    assert parse_args(SEED["fastclip-v0"]).lr_tau == 1e-3  # --lr_tau unset: equals --lr
    assert parse_args(SEED["fastclip-v1"]).temperature_scheme == "global_constant"
    v2 = parse_args(SEED["fastclip-v2"])
    assert (v2.temperature_scheme, v2.lr_tau, v2.lr_tau_scheduler, v2.temperature, v2.rho) == (
        "individual_learnable", 0.0133, "const", 0.03, 7.0)
    oc = parse_args(SEED["openclip"])
    assert oc.local_loss and oc.gather_with_grad and not oc.fastclip


def test_seed_evaluation_command():
    a = parse_args(SEED["eval-imagenet"])
    assert a.resume == "./logs/medium_fastclipv3/checkpoints/epoch_37.pt"
    assert (a.zeroshot_frequency, a.imagenet_val, a.epochs, a.batch_size) == (1, "./datasets/imagenet/val", 0, 512)
    assert a.dataset_type == "none"


def test_both_spellings_accepted():
    a = parse_args(["--train-num-samples", "10", "--data-size", "20", "--train_data", "x.tar", "--batch_size", "4"])
    assert (a.data_size, a.train_data, a.batch_size) == (20, "x.tar", 4)


def test_vit_defaults_and_precision_default():
    a = parse_args(["--model", "ViT-B-32"])
    assert (a.lr, a.beta1, a.beta2, a.eps, a.precision) == (5e-4, 0.9, 0.98, 1e-6, "auto")


BASE = ["--train-data", "x.tar", "--train-num-samples", "100", "--fastclip"]


@pytest.mark.parametrize("extra, message", [
    ([], "--data_size"),
    (["--data_size", "50"], "smaller than --train-num-samples"),
    (["--data_size", "200", "--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--data_size", "200", "--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--data_size", "200", "--gather-with-grad"], "drop --gather-with-grad"),
    (["--data_size", "200", "--multiply_tau", "--temperature_scheme", "individual_learnable"], "global temperature"),
    (["--data_size", "200", "--temperature_scheme", "individual_learnable", "--lr_tau_scheduler", "cosine"],
     "--lr_tau_scheduler const"),
])
def test_fastclip_flag_validation(extra, message):
    with pytest.raises(SystemExit) as err:
        parse_args(BASE + extra)
    assert message in str(err.value)


def test_unknown_temperature_scheme_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--data_size", "200", "--temperature_scheme", "per_pixel"])
    assert "invalid choice" in capsys.readouterr().err


def test_webdataset_needs_num_samples():
    with pytest.raises(SystemExit, match="--train-num-samples"):
        parse_args(["--train-data", "x.tar"])
