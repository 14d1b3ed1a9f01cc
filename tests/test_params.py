"""Flag parsing: every seed command line parses with the seed's meaning; bad combinations fail clearly."""

from __future__ import annotations

import argparse
import math

import pytest

from conftest import SEED_COMMANDS
from training.config import Config
from training.params import DEFAULT_MODEL, MINIMUM, POSITIVE, build_parser, model_defaults, parse_args

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


SYNTHETIC = ["--dataset-type", "synthetic", "--train-num-samples", "64"]


def test_vit_defaults_and_precision_default():
    a = parse_args(SYNTHETIC + ["--model", "ViT-B-32"])
    assert (a.lr, a.beta1, a.beta2, a.eps, a.precision) == (5e-4, 0.9, 0.98, 1e-6, "auto")


BASE = ["--train-data", "x.tar", "--train-num-samples", "100", "--fastclip"]


@pytest.mark.parametrize("extra, message", [
    ([], "--data_size"),
    (["--data_size", "50"], "smaller than --train-num-samples"),
    (["--data_size", "200", "--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--data_size", "200", "--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--data_size", "200", "--gather-with-grad"], "drop --gather-with-grad"),
    (["--data_size", "200", "--multiply_tau", "--temperature_scheme", "individual_learnable"],
     "use --temperature_scheme global_learnable, or drop --multiply_tau for FastCLIP-v2"),
    (["--data_size", "200", "--multiply_tau", "--temperature_scheme", "global_constant"],
     "use --temperature_scheme global_learnable, or drop --multiply_tau for FastCLIP-v1"),
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


@pytest.mark.parametrize("extra, message", [
    (["--multiply_tau"], "--multiply_tau selects FastCLIP-v3's loss: add --fastclip"),
    (["--multiply_tau", "--temperature_scheme", "global_constant"], "add --fastclip"),
    (["--temperature_scheme", "individual_learnable"], "is FastCLIP-v2's per-sample temperature: add --fastclip"),
    (["--siglip", "--temperature_scheme", "global_constant"], "--siglip learns its logit scale"),
])
def test_fastclip_flags_without_fastclip_are_refused(extra, message):
    """Without --fastclip these flags would silently train OpenCLIP."""
    with pytest.raises(SystemExit) as err:
        parse_args(SYNTHETIC + extra)
    assert message in str(err.value.code)


def test_every_fastclip_version_of_the_objective_accepts_its_flags():
    """What the flags allow is what FastCLIPConfig builds: every accepted scheme constructs."""
    from fastclip.losses.fastclip import TEMPERATURE_SCHEMES, FastCLIPConfig

    for scheme in TEMPERATURE_SCHEMES:
        for multiply_tau in (False, True):
            argv = SYNTHETIC + ["--fastclip", "--temperature_scheme", scheme] + ["--multiply_tau"] * multiply_tau
            try:
                a = parse_args(argv)
            except SystemExit:
                with pytest.raises(ValueError):
                    FastCLIPConfig(data_size=64, temperature_scheme=scheme, multiply_tau=multiply_tau)
                continue
            FastCLIPConfig(data_size=a.data_size, temperature_scheme=a.temperature_scheme, multiply_tau=a.multiply_tau)


@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"), ("--batch-size", "-8"), ("--workers", "-1"), ("--epochs", "-1"), ("--lr", "0"),
    ("--lr", "-0.001"), ("--lr", "nan"), ("--warmup", "-1"), ("--seed", "-1"), ("--train-num-samples", "0"),
    ("--log-every-n-steps", "0"), ("--beta2", "1.0"), ("--eps", "0"), ("--wd", "-0.1"), ("--stop_epochs", "0"),
    ("--grad-clip-norm", "0"), ("--val-num-samples", "0"), ("--dist-timeout", "0"), ("--max-bad-steps", "0"),
])
def test_senseless_numbers_are_one_line_errors(flag, value):
    with pytest.raises(SystemExit) as err:
        parse_args(SYNTHETIC + [flag, value])
    message = str(err.value.code)
    assert message.startswith(f"error: {flag.replace('_', '-')} must be") and "\n" not in message
    got = float(message.rsplit(", got ", 1)[1])
    assert got == float(value) or (math.isnan(got) and value == "nan")


def test_every_minimum_and_positive_names_a_flag():
    dests = {action.dest for action in build_parser()._actions}
    assert set(MINIMUM) <= dests and set(POSITIVE) <= dests


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to do: pass --train-data SHARDS --train-num-samples N to train"),
    (["--model", "RN50", "--seed", "3"], "nothing to do"),
    (["--train-data", "x.tar", "--train-num-samples", "10", "--epochs", "0"],
     "--epochs 0 evaluates, but no evaluation is set: add --imagenet-val DIR"),
    (["--epochs", "0", "--imagenet-val", "val"], "would evaluate random weights"),
    (SYNTHETIC + ["--zeroshot-classnames", "names.txt"], "add --imagenet-val DIR"),
    (["--dataset-type", "synthetic"], "--dataset-type synthetic needs --train-num-samples"),
    (["--dataset-type", "webdataset", "--train-num-samples", "10"], "add --train-data SHARDS"),
    (SYNTHETIC + ["--train-eval-num-samples", "32"], "--train-eval-num-samples evaluates the first pairs"),
])
def test_a_run_that_would_do_nothing_says_what_is_needed(argv, message):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert message in str(err.value.code)


def test_evaluation_of_a_pretrained_model_needs_no_checkpoint():
    a = parse_args(["--epochs", "0", "--imagenet-val", "val", "--pretrained", "openai", "--model", "ViT-B-32"])
    assert a.dataset_type == "none" and a.pretrained == "openai"


def test_model_defaults_to_rn50_when_nothing_is_resumed():
    a = parse_args(SYNTHETIC)
    assert (a.model, a.model_source) == (DEFAULT_MODEL, "the default (no --model)")
    assert a.name.startswith(f"{DEFAULT_MODEL}-openclip-") and (a.beta2, a.lr_tau) == (0.999, a.lr)


def test_resuming_without_model_leaves_it_to_the_checkpoint():
    """`--resume PATH` without --model: the model, what depends on it and the default name wait for the
    checkpoint (`model_defaults`, applied by preflight to the run's Config)."""
    a = parse_args(["--epochs", "0", "--imagenet-val", "val", "--resume", "ckpt.pt"])
    assert (a.model, a.lr, a.beta2, a.name) == (None, None, None, None) and a.lr_tau < 0
    c = Config.from_args(a)
    c = c.replace(**model_defaults(c.flat(), "ViT-B-32", "the checkpoint ckpt.pt"))
    assert (c.model.model, c.optim.beta2, c.optim.eps, c.optim.lr_tau) == ("ViT-B-32", 0.98, 1e-6, c.optim.lr)
    assert c.run.name.startswith("ViT-B-32-openclip-") and c.model.model_source == "the checkpoint ckpt.pt"
    assert a.model is None  # the parsed flags are left as they were


def test_resume_latest_without_model_or_name_looks_in_the_default_models_folder():
    a = parse_args(SYNTHETIC + ["--resume", "latest"])
    assert a.model is None and a.name == parse_args(SYNTHETIC).name


def test_explicit_model_is_kept_when_resuming():
    a = parse_args(SYNTHETIC + ["--resume", "latest", "--model", "ViT-B-32", "--lr", "0.002"])
    assert (a.model, a.model_source, a.lr, a.lr_tau, a.beta2) == ("ViT-B-32", "--model", 0.002, 0.002, 0.98)


def test_every_flag_has_help():
    parser = build_parser()
    missing = [action.option_strings[0] for action in parser._actions
               if not action.help or action.help == argparse.SUPPRESS or len(action.help) < 15]
    assert missing == []


def help_entries() -> dict[str, str]:
    """`--help`'s text of each flag (first spelling -> its lines joined), as argparse prints it."""
    entries: dict[str, str] = {}
    flag = None
    for line in build_parser().format_help().splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
    return entries


def test_help_shows_defaults():
    entries = help_entries()
    for flag, default in (("--batch-size", "64"), ("--seed", "0"), ("--accum-freq", "1"), ("--workers", "4"),
                          ("--temperature_scheme", "global_learnable"), ("--precision", "auto"), ("--logs", "./logs")):
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]
    assert not any("(default: None)" in text or "(default: False)" in text for text in entries.values())
    assert "the model of the --resume checkpoint, else RN50" in " ".join(entries["--model"].split())
